"""vit_probe: timm weights from a local file, per-block features, one split for all probes, the record,
the selection costs and SK's grid, the validation-selected headline and the README's comparisons, and the
paper path (a timm ViT from a local checkpoint on fake CIFAR-10 and CIFAR-100) offline."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import experiments.vit_probe as vp
from experiments.backbones import create
from experiments.backbones.vit import block_hooks
from experiments.core import probes
from experiments.core.data import train_val_split
from experiments.reports import vit_probe as report
from experiments.core.runner import run_experiment
from paper_fixtures import TIMM_MODEL, allow_fake_cifar, refuse_network, write_fake_cifar, write_timm_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A tiny offline setting: digits (8x8, resized to 28), a 2-block ViT, one pretraining epoch, short probes.
TINY_GROUPS = ["logger=none", "data=digits", "backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2"]
TINY_EXP = {"pretrain.epochs": 1, "pretrain.per_class": None, "probe_labelled": 150, "probe_test": 100}
TINY_PROBES = {"linear.grid.C": [0.1, 10.0], "linear.max_iter": 20, "knn.grid.k": [5, 20], "knn.grid.temperature": [0.07]}
TINY_SK_GRID = {"k": [5, 10], "kernel": ["gaussian"], "lengthscale_mult": [1.0], "ridge": [1e-3]}
TINY_CLI = TINY_GROUPS + [
    "exp.pretrain.epochs=1", "exp.pretrain.per_class=null", "exp.probe_labelled=150", "exp.probe_test=100",
    "probe.linear.grid.C=[0.1,10.0]", "probe.linear.max_iter=20", "probe.knn.grid.k=[5,20]",
    "probe.knn.grid.temperature=[0.07]", "sk.grid={k:[5,10],kernel:[gaussian],lengthscale_mult:[1.0],ridge:[1.0e-3]}"]


def tiny_cfg(tmp_path, *extra):
    """The composed config with the quick profile merged, then TINY_EXP on top (as the command line would)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+exp=vit_probe", f"paths.root={ROOT}", f"paths.results={tmp_path}/results",
            f"paths.cache={tmp_path}/cache", *TINY_GROUPS, *extra])
    for key, value in TINY_EXP.items():
        OmegaConf.update(cfg, f"exp.{key}", value, merge=False)
    for key, value in TINY_PROBES.items():
        OmegaConf.update(cfg, f"probe.{key}", value, merge=False)
    OmegaConf.update(cfg, "sk.grid", TINY_SK_GRID, merge=False)
    return cfg


def records(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs" / "vit_probe").glob("**/*.json"))]


def test_timm_backbone_reads_weights_from_a_local_checkpoint(tmp_path, monkeypatch):
    import timm
    import timm.models._builder as builder

    def no_network(*a, **k):
        raise AssertionError("tried to fetch weights from the network")

    monkeypatch.setattr(builder, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", no_network)
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)

    cfg = OmegaConf.create({"name": "timm", "model": "vit_tiny_patch16_224", "pretrained": True,
                            "checkpoint_path": str(path), "img_size": 32})
    torch.manual_seed(2)  # a different random init, which the checkpoint must overwrite
    backbone = create(cfg, depth=2)
    loaded, expected = backbone.model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    random_init = create(OmegaConf.create({**cfg, "pretrained": False, "checkpoint_path": None}), depth=2)
    assert not torch.equal(random_init.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    # preprocessing follows the model: its own input size, RGB, the checkpoint's normalisation
    assert (backbone.img_size, backbone.in_chans) == (32, 3)
    assert backbone.mean_std == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbone.depth == 2 and backbone.has_cls and backbone.num_prefix_tokens == 1


def test_block_hooks_give_one_tensor_per_block():
    cfg = OmegaConf.create({"name": "vit_tiny28", "img_size": 28, "patch_size": 7, "in_chans": 1,
                            "embed_dim": 32, "depth": 3, "num_heads": 2})
    torch.manual_seed(0)
    backbone = create(cfg).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        tokens = backbone.block_tokens(x)
        feats = backbone.probe_features(x)
        final = backbone.model.forward_features(x)
    assert len(tokens) == 3 and all(t.shape == (5, 1 + 16, 32) for t in tokens)
    assert not torch.allclose(tokens[0], tokens[1])
    # the last block's output is what timm's final norm sees
    assert torch.allclose(backbone.model.norm(tokens[-1]), final, atol=1e-5)
    assert feats["cls"].shape == feats["mean"].shape == (5, 3, 32)
    for i, t in enumerate(tokens):
        assert torch.equal(feats["cls"][:, i], t[:, 0])
        assert torch.allclose(feats["mean"][:, i], t[:, 1:].mean(1))
    assert all(len(b._forward_hooks) == 0 for b in backbone.model.blocks)  # hooks are removed
    with pytest.raises(ValueError, match="blocks"):
        with block_hooks(torch.nn.Linear(2, 2)):
            pass


def test_each_probe_reaches_100_percent_on_separable_data():
    g = torch.Generator().manual_seed(0)
    centers = 10.0 * torch.eye(4, 16)
    y = torch.arange(4).repeat_interleave(30)
    x = centers[y] + 0.5 * torch.randn(len(y), 16, generator=g)
    lab = torch.arange(len(y)) % 3 != 0
    fit_idx, val_idx = train_val_split(int(lab.sum()), 0.25, g)
    options = {"linear": {"grid": {"C": [0.01, 1.0, 100.0]}, "default": {"C": 1.0}, "max_iter": 50},
               "knn": {"grid": {"k": [5, 10], "temperature": [0.07]}, "default": {"k": 5, "temperature": 0.07}},
               "sk": {"grid": {"k": [4, 8], "kernel": ["gaussian"], "lengthscale_mult": [1.0], "ridge": [1e-3]},
                      "default": {"k": 8, "kernel": "gaussian", "lengthscale": "auto", "ridge": 1e-3}}}
    task = probes.ProbeTask(x[lab], y[lab], x[~lab], y[~lab], 4, probes.holdout(fit_idx, val_idx))
    results = {name: probes.run_probe(name, task, opts) for name, opts in options.items()}
    assert all(r.test_acc == 1.0 for r in results.values()), [(n, r.test_acc) for n, r in results.items()]
    assert len({r.selection for r in results.values()}) == 1 and results["sk"].selection.startswith("holdout ")


def test_probe_sets_are_disjoint_and_drawn_by_the_seed():
    a = vp.draw_probe_sets("test", 1000, 300, 100, 120, torch.Generator().manual_seed(0))
    b = vp.draw_probe_sets("test", 1000, 300, 100, 120, torch.Generator().manual_seed(0))
    c = vp.draw_probe_sets("test", 1000, 300, 100, 120, torch.Generator().manual_seed(1))
    lab, tst = a
    assert (len(lab), len(tst)) == (100, 120) and not set(lab.tolist()) & set(tst.tolist())
    assert max(lab.max(), tst.max()) < 300  # both from the held-out split
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="exceeds"):
        vp.draw_probe_sets("test", 1000, 300, 200, 120, torch.Generator().manual_seed(0))


def test_all_probes_get_the_same_split_and_features_and_each_seed_pretrains_its_own_vit(tmp_path, monkeypatch):
    calls: list[tuple[str, probes.ProbeTask]] = []
    real = vp.run_probe

    def recorder(name, task, options):
        calls.append((name, task))
        return real(name, task, options)

    monkeypatch.setattr(vp, "run_probe", recorder)
    for seed in (0, 1):
        run_experiment(tiny_cfg(tmp_path, f"seed={seed}"))

    jobs = 2 * 2  # blocks x tokens
    assert len(calls) == 2 * jobs * 3  # seeds x jobs x (linear, knn, sk)
    per_seed = [calls[:jobs * 3], calls[jobs * 3:]]
    for seed_calls in per_seed:
        for j in range(jobs):
            (n1, lin), (n2, knn), (n3, skp) = seed_calls[3 * j: 3 * j + 3]
            assert (n1, n2, n3) == ("linear", "knn", "sk")
            assert lin is knn is skp  # one task: the same features, labels, split and test set for every probe
            assert lin.x.shape == (150, 32) and lin.test_x.shape == (100, 32) and lin.selection.rule == "holdout"
            # one split per seed, shared by every (block, token)
            assert lin.selection.fingerprint() == seed_calls[0][1].selection.fingerprint()
            assert torch.equal(lin.y, seed_calls[0][1].y)
        assert not torch.equal(seed_calls[0][1].x, seed_calls[6][1].x)  # block 1 vs block 2
    # the seed redraws the probe data, and pretrains its own ViT (exp.pretrain.seed: null)
    assert not torch.equal(per_seed[0][0][1].y, per_seed[1][0][1].y)
    assert len(list((tmp_path / "cache" / "vit_tiny28_pretrain").glob("*.pt"))) == 2
    assert len(list((tmp_path / "cache" / "vit_probe_features").glob("*.pt"))) == 2

    recs = records(tmp_path)
    assert sorted(r["seed"] for r in recs) == [0, 1]
    for rec in recs:
        keys = {(r["keys"]["block"], r["keys"]["token"], r["keys"]["probe"]) for r in rec["rows"]}
        assert keys == {(b, t, p) for b in (1, 2) for t in ("cls", "mean") for p in ("linear", "knn", "sk")}
        for row in rec["rows"]:
            assert {"test_acc", "fit_s", "predict_s", "val_acc", "select_s", "settings_tried"} <= set(row["metrics"])
            assert row["info"]["chosen"]
            acc = row["metrics"]["test_acc"]
            assert abs(100 * acc - round(100 * acc)) < 1e-4, row  # a count of the 100 probe test images
        _check_selection(rec, n_c=2, n_sk=2, n_knn=2)
        assert rec["summary"]["probe_split"] == "test" and rec["summary"]["n_labelled"] == 150
        # digits through a ViT pretrained for one epoch on 5 classes: the best probe is well above chance (0.1)
        assert max(r["metrics"]["test_acc"] for r in rec["rows"]) >= 0.3
    png = tmp_path / "vit_probe.png"
    report.make_figure(recs, png)
    assert png.stat().st_size > 1000


def _check_selection(rec: dict, n_c: int, n_sk: int, n_knn: int) -> None:
    """Selection costs and SK's grid in every row, every probe choosing on the same split; the headline
    picked by validation, not by test."""
    for row in rec["rows"]:
        m, probe = row["metrics"], row["keys"]["probe"]
        grid = row["sk_grid"] if probe == "sk" else row["selection_scores"]
        assert m["settings_tried"] == len(grid) == {"linear": n_c, "knn": n_knn, "sk": n_sk}[probe], probe
        assert 0 < m["select_s"] <= m["fit_s"] and m["val_acc"] == max(e["val_acc"] for e in grid), probe
    assert all({"k", "kernel", "lengthscale_mult", "ridge", "val_acc"} <= set(e)
               for r in rec["rows"] if r["keys"]["probe"] == "sk" for e in r["sk_grid"])
    assert len({r["info"]["selection"] for r in rec["rows"]}) == 1
    for probe in ("linear", "knn", "sk"):
        mine = [r for r in rec["rows"] if r["keys"]["probe"] == probe]
        by_val = max(mine, key=lambda r: r["metrics"]["val_acc"])  # ties: the first in row order, as the summary
        assert rec["summary"][f"{probe}_selected_test_acc"] == by_val["metrics"]["test_acc"]
        assert rec["summary"][f"{probe}_selected"] == f"block {by_val['keys']['block']} {by_val['keys']['token']}"


def _rec(seed: int, accs: dict, select: dict | None = None) -> dict:
    """A record with rows {(block, token, probe): (test_acc, val_acc)}; ``select``: {probe: select_s a row}."""
    select = select or {}
    rows = [{"keys": {"block": b, "token": t, "probe": p},
             "metrics": {"test_acc": ta, "val_acc": va, "fit_s": 1.0, "select_s": select.get(p, 0.0),
                         "settings_tried": {"linear": 12, "sk": 72}.get(p, 1)}}
            for (b, t, p), (ta, va) in accs.items()]
    return {"seed": seed, "rows": rows}


def test_comparisons_quote_ranges_and_the_validation_selected_headline():
    # two seeds, two feature sets; block 2's test accuracy is higher, block 1's validation accuracy is
    recs = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        recs.append(_rec(seed, {
            (1, "cls", "linear"): (0.7000 + shift, 0.90), (1, "cls", "sk"): (0.6996 + shift, 0.80),
            (1, "cls", "knn"): (0.6500 + shift, 0.70),
            (2, "cls", "linear"): (0.8000 + shift, 0.85), (2, "cls", "sk"): (0.7764 + shift, 0.95),
            (2, "cls", "knn"): (0.7000 + shift, 0.60)}, select={"linear": 2.0, "sk": 3.0}))
    lines = report.comparisons(recs)
    assert lines[0] == ("- linear − SK test accuracy over the 2 feature sets (2 blocks × 1 token), each the mean over "
                        "2 seeds, in points: 0.04–2.36 (smallest at block 1 cls, largest at block 2 cls)")
    assert lines[1].endswith("in points: 4.96–7.64 (smallest at block 1 cls, largest at block 2 cls)")
    # chosen by validation: linear and k-NN at block 1, SK at block 2, whatever the test accuracy says (probes in
    # the records' row order)
    assert lines[2] == ("- Validation-selected headline (each seed's (block, token) with the best validation accuracy; "
                        "test accuracy mean ± std over 2 seeds): linear 71.00 ± 1.41 % (block 1 cls in 2 of 2); "
                        "SK 78.64 ± 1.41 % (block 2 cls in 2 of 2); k-NN 66.00 ± 1.41 % (block 1 cls in 2 of 2)")
    # the headlines paired over seeds: SK − linear (+7.64, +7.64: a zero-width interval) and SK − k-NN, Holm over 2
    assert lines[3].startswith("- Paired differences of the validation-selected headlines")
    assert lines[4] == ("  - `sk − linear (selected)`: +7.64 [+7.64, +7.64] points, n = 2 seeds (paired t, Holm over 2, "
                        "95 % family-wise): **better**")
    assert lines[6].startswith("- **Claim** (the paper's): SK probes") and "**Verdict: held**" in lines[6]
    assert lines[7] == ("- Selection cost (seconds choosing hyperparameters on the validation split, summed over the 2 "
                        "feature sets, mean over seeds): SK 6 s (72 settings a feature set), linear 4 s (12 values of C): "
                        "SK 1.50× the linear probe's")
    # a negative end keeps its minus sign
    flipped = [_rec(0, {(1, "mean", "linear"): (0.70, 0.5), (1, "mean", "sk"): (0.71, 0.5),
                        (2, "mean", "linear"): (0.80, 0.5), (2, "mean", "sk"): (0.78, 0.5)})]
    assert "in points: −1.00–2.00" in report.comparisons(flipped)[0]


def test_cli_run_writes_a_record(cli, tmp_path):
    cli("+exp=vit_probe", *TINY_CLI, "exp.tokens=[mean]", "exp.blocks=[2]")
    (rec,) = records(tmp_path)
    assert rec["experiment"] == "vit_probe" and rec["profile"] == "quick"
    assert {r["keys"]["probe"] for r in rec["rows"]} == {"linear", "knn", "sk"}
    assert {(r["keys"]["block"], r["keys"]["token"]) for r in rec["rows"]} == {(2, "mean")}
    assert rec["curves"]["sk-mean"]["x"] == [2]


def test_sk_keys_on_the_command_line_reach_the_sk_probe(cli, tmp_path):
    """profile=smoke holds sk.grid.k = [5, 10]: a grid of its own and the fixed setting both show in every
    SK row of the record."""
    smoke = ["+exp=vit_probe", "profile=smoke", "logger=none", "exp.tokens=[mean]"]
    cli(*smoke, "sk.grid.k=[7]", "sk.grid.kernel=[laplacian]")
    cli(*smoke, "sk.tune=false", "sk.k=3", "sk.kernel=imq", "sk.ridge=0.25")
    recs = records(tmp_path)
    (tuned,) = [r for r in recs if "sk.grid.k=[7]" in r["command"]]
    (fixed,) = [r for r in recs if "sk.tune=false" in r["command"]]
    for rec, prefix in ((tuned, "k=7, kernel=laplacian,"), (fixed, "k=3, kernel=imq,")):
        assert rec["profile"] == "smoke"
        sk_rows = [r for r in rec["rows"] if r["keys"]["probe"] == "sk"]
        assert len(sk_rows) == 2  # two blocks, one token
        assert all(r["info"]["chosen"].startswith(prefix) for r in sk_rows), [r["info"] for r in sk_rows]
    assert all(r["info"]["chosen"].endswith("ridge=0.25") for r in fixed["rows"] if r["keys"]["probe"] == "sk")
    assert fixed["summary"]["val_acc"] == max(r["metrics"]["val_acc"] for r in fixed["rows"] if r["keys"]["probe"] == "sk")


@pytest.mark.parametrize("data,per_class", [("cifar10", (20, 10)), ("cifar100", (3, 2))])
def test_paper_path_probes_a_local_timm_checkpoint_on_fake_cifar(tmp_path, monkeypatch, data, per_class):
    """The paper's ViT probing (Makefile: backbone=timm, data=cifar10|cifar100) with the weights from a local
    checkpoint file, offline: labelled probe data from the train split, tested on the test split."""
    refuse_network(monkeypatch)
    allow_fake_cifar(monkeypatch)
    write_fake_cifar(tmp_path / "data", data, *per_class)
    ckpt = write_timm_checkpoint(tmp_path / "vit.pth", img_size=32)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+exp=vit_probe", "profile=smoke", "logger=none", f"paths.root={ROOT}", f"paths.results={tmp_path}/results",
            f"paths.cache={tmp_path}/cache", f"data={data}", f"data.root={tmp_path}/data", "data.download=false",
            "backbone=timm", f"backbone.model={TIMM_MODEL}", f"backbone.checkpoint_path={ckpt}", "backbone.img_size=32",
            "exp.blocks=[1,6]", "exp.probe_labelled=null", "exp.probe_test=null"])
    run_experiment(cfg)
    (rec,) = records(tmp_path)
    classes = {"cifar10": 10, "cifar100": 100}[data]
    n_train, n_test = classes * per_class[0], classes * per_class[1]
    assert rec["summary"]["probe_split"] == "train_test"
    assert (rec["summary"]["n_labelled"], rec["summary"]["n_test"]) == (n_train, n_test)
    assert {(r["keys"]["block"], r["keys"]["token"]) for r in rec["rows"]} == {(b, t) for b in (1, 6) for t in ("cls", "mean")}
    assert rec["config"]["backbone"]["checkpoint_path"] == str(ckpt) and rec["config"]["data"]["name"] == data
    _check_selection(rec, n_c=len(cfg.probe.linear.grid.C),
                     n_sk=len(cfg.sk.grid.k) * len(cfg.sk.grid.kernel) * len(cfg.sk.grid.lengthscale_mult) * len(cfg.sk.grid.ridge),
                     n_knn=len(cfg.probe.knn.grid.k) * len(cfg.probe.knn.grid.temperature))
    for r in rec["rows"]:
        acc = r["metrics"]["test_acc"]
        assert abs(n_test * acc - round(n_test * acc)) < 1e-4, r
    # one colour a class: the mean patch token of the first block separates them (chance: 1 / classes)
    for probe in ("linear", "knn", "sk"):
        (row,) = [r for r in rec["rows"] if r["keys"] == {"block": 1, "token": "mean", "probe": probe}]
        assert row["metrics"]["test_acc"] >= 0.6, (probe, row["metrics"])
    lines = report.comparisons([rec])
    assert len(lines) == 8 and "Validation-selected headline" in lines[2] and lines[6].startswith("- **Claim**")
