"""CNN readout experiment (issues 4 and 13) and the shared training helper, on tiny data.

What the experiment promises and these tests check: every trained readout is chosen on the validation
split (the chosen setting is the argmax of the recorded validation accuracies, every setting of the grid
is tried and counted), the frozen readouts read the chosen backbone, the trained readouts learn, the
comparisons quote the table's own numbers, and the paper's path (CIFAR-10, ResNet-18) runs offline.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import experiments.cnn_readout as cr
from experiments.backbones import create
from experiments.cnn_readout import READOUT_ORDER, Candidate, SKHead, select, sk_loss
from experiments.core.format import setting_text
from experiments.core.probes import ProbeTask, grid_settings, holdout, run_probe
from experiments.reports.cnn_readout import comparisons, make_figure
from experiments.core.cache import module_fingerprint
from experiments.core.data import load_digits
from experiments.core.runner import run_experiment
from experiments.core.train import count_params, extract_features, train_classifier
from scripts import make_tables

ROOT = Path(__file__).resolve().parents[1]
SMALL_CNN = OmegaConf.create({"name": "small_cnn", "in_channels": 1, "width": 8, "feature_dim": 16})
SK = {"normalize": True, "backend": "torch", "default": {"k": 8, "kernel": "gaussian", "lengthscale": "auto", "ridge": 1e-3}}
GRID = {"k": [4, 8], "kernel": ["gaussian", "laplacian"], "lengthscale_mult": [1.0], "ridge": [1e-4]}
QUIET = dict(progress=lambda it, **kw: it)

# Digits, small enough for seconds and learnable: 700 fit / 200 validation / 300 test images, 6 epochs of
# 21 steps (readout 4 and the control: 3); learning rates a decade apart so that validation tells them apart.
LRS = [3e-4, 3e-3, 3e-2]
DIGITS = ["data=digits", "seed=1", "backbone.width=8", "backbone.feature_dim=16", "exp.train_size=900",
          "exp.val_size=200", "exp.test_size=null", "exp.epochs=6", "exp.sk_epochs_frac=0.5",
          "exp.optim.default.batch_size=32", f"exp.optim.default.lr_grid=[{','.join(map(str, LRS))}]",
          "probe.mlp.epochs=5", "probe.mlp.grid.lr=[1e-3,1e-2]", "probe.mlp.grid.weight_decay=[0.0,1e-3]",
          "probe.knn.grid.k=[5,20]", "probe.knn.grid.temperature=[0.07,1.0]",
          "exp.eval_batch_size=256", "sk.head.k=8",
          "sk.grid={k:[4,8],kernel:[gaussian],lengthscale_mult:[1.0],ridge:[1e-4]}"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "+exp=cnn_readout", "logger=none", f"paths.root={ROOT}", f"paths.results={tmp_path}/results",
            f"paths.cache={tmp_path}/cache", *overrides])


def only_record(tmp_path) -> dict:
    (path,) = (tmp_path / "results" / "runs" / "cnn_readout").glob("**/*.json")
    return json.loads(path.read_text())


def best_of(selection: list[dict]) -> dict:
    """The first setting with the best validation accuracy: what a selection on validation must choose."""
    best = max(selection, key=lambda e: e["val_acc"])
    return {k: v for k, v in best.items() if k != "val_acc"}


# ----------------------------------------------------------------------------------------- the whole run
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, one_thread):
    """One in-process run on digits, recording the weights of every backbone run and which backbone the
    frozen readouts read."""
    tmp_path = tmp_path_factory.mktemp("digits_run")
    trained, frozen = [], []
    train_backbone, frozen_features = cr.train_backbone, cr.frozen_features

    def recording_train(backbone, head, split, s, *, lr, desc, **kw):
        run = train_backbone(backbone, head, split, s, lr=lr, desc=desc, **kw)
        trained.append((desc, lr, module_fingerprint(run.backbone)))
        return run

    def recording_features(backbone, *args, **kw):
        frozen.append(module_fingerprint(backbone))
        return frozen_features(backbone, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cr, "train_backbone", recording_train)
        mp.setattr(cr, "frozen_features", recording_features)
        run_experiment(compose_cfg(tmp_path, *DIGITS))
    rec = only_record(tmp_path)
    return rec, {r["keys"]["readout"]: r for r in rec["rows"]}, trained, frozen


def test_every_trained_readout_is_chosen_on_validation_from_its_whole_grid(digits_run):
    rec, rows, _, _ = digits_run
    assert list(rows) == READOUT_ORDER
    grids = {"linear_joint": [{"lr": lr} for lr in LRS], "linear_joint_short": [{"lr": lr} for lr in LRS],
             "sk_e2e": [{"lr": lr} for lr in LRS],
             "mlp_frozen": grid_settings({"lr": [1e-3, 1e-2], "weight_decay": [0.0, 1e-3]}),
             "knn_frozen": grid_settings({"k": [5, 20], "temperature": [0.07, 1.0]})}
    for name, grid in grids.items():
        row = rows[name]
        scores = row["selection"] if "selection" in row else row["selection_scores"]  # backbone runs | probes
        tried = [{k: v for k, v in e.items() if k != "val_acc"} for e in scores]
        assert tried == grid, name
        chosen = best_of(scores)
        shown = setting_text(chosen).replace("temperature=", "T=")
        assert row["info"]["chosen"].startswith(shown), (name, row["info"]["chosen"])
        assert row["metrics"]["val_acc"] == max(e["val_acc"] for e in scores), name
        assert row["metrics"]["select_s"] > 0, name
    for name in ("linear_joint", "linear_joint_short", "mlp_frozen", "knn_frozen"):
        assert rows[name]["metrics"]["settings_tried"] == len(grids[name]), name
    # readout 4: every learning rate times every SK setting; SK rows keep SK's whole grid
    assert rows["sk_e2e"]["metrics"]["settings_tried"] == len(LRS) * 2
    assert rows["sk_frozen"]["metrics"]["settings_tried"] == 2
    for name in ("sk_frozen", "sk_e2e"):
        grid = rows[name]["sk_grid"]
        assert [e["k"] for e in grid] == [4, 8] and {"kernel", "lengthscale_mult", "ridge", "val_acc"} <= set(grid[0])
        best = max(grid, key=lambda e: e["val_acc"])
        assert f"k={best['k']}, kernel=gaussian," in rows[name]["info"]["chosen"], rows[name]["info"]
    assert rows["sk_frozen"]["metrics"]["val_acc"] == max(e["val_acc"] for e in rows["sk_frozen"]["sk_grid"])
    # every readout chose on the same validation split (the same selection data, named in each row)
    assert len({r["info"]["selection"] for r in rows.values()}) == 1, {k: r["info"]["selection"] for k, r in rows.items()}
    # choosing among three learning rates trains two runs more than the chosen one: it costs more than its training
    assert rows["linear_joint"]["metrics"]["select_s"] > rows["linear_joint"]["metrics"]["train_s"] > 0


def test_frozen_readouts_read_the_chosen_backbone(digits_run):
    _, rows, trained, frozen = digits_run
    joint = {lr: fp for desc, lr, fp in trained if desc.startswith("1 linear")}
    assert sorted(joint) == LRS and len(set(joint.values())) == len(LRS)  # three different backbones
    chosen_lr = best_of(rows["linear_joint"]["selection"])["lr"]
    assert frozen == [joint[chosen_lr]]
    assert rows["mlp_frozen"]["info"]["backbone"] == f"frozen, from linear_joint (lr={chosen_lr:.3g})"
    assert sum(desc.startswith("4 backbone") for desc, _, _ in trained) == len(LRS)


def test_trained_readouts_learn_and_report_their_costs(digits_run):
    rec, rows, _, _ = digits_run
    for name, r in rows.items():  # ten balanced classes: chance is about 10%
        assert r["metrics"]["test_acc"] > 0.5, (name, r["metrics"]["test_acc"])
        assert r["info"]["train_fit"] == "700" and r["info"]["val"] == "200" and r["info"]["test"] == "300"
    assert rows["linear_joint"]["metrics"]["head_params"] == 16 * 10 + 10
    assert rows["mlp_frozen"]["metrics"]["head_params"] == 16 * 256 + 256 + 256 * 10 + 10
    assert rows["sk_frozen"]["metrics"]["head_params"] == 0 and rows["sk_frozen"]["metrics"]["train_s"] == 0
    assert rows["linear_joint"]["metrics"]["train_epochs"] == 6 and rows["sk_e2e"]["metrics"]["train_epochs"] == 3
    assert rows["linear_joint"]["metrics"]["train_s"] > 0 and rows["sk_e2e"]["metrics"]["train_s"] > 0
    # the curves are the chosen runs' (their last point is the row's test accuracy for readout 1)
    assert rec["curves"]["linear_joint"]["x"] == [1, 2, 3, 4, 5, 6] and rec["curves"]["sk_e2e"]["x"] == [1, 2, 3]
    assert rec["curves"]["linear_joint"]["y"][-1] == pytest.approx(rows["linear_joint"]["metrics"]["test_acc"])
    assert rec["summary"]["val_acc"] == rows["sk_e2e"]["metrics"]["val_acc"]


def test_figure_and_comparisons_from_a_run(digits_run, tmp_path):
    rec, rows, _, _ = digits_run
    make_figure([rec, rec], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
    lines = comparisons([rec])
    assert any("(one seed: no CI)" in line for line in lines)


# ----------------------------------------------------------------------------------------- selection
def test_select_keeps_the_first_best_and_counts_what_the_others_cost():
    outcomes = {1: (0.5, 2.0, 0.25), 2: (0.75, 3.0, 0.5), 3: (0.75, 4.0, 0.25), 4: (0.25, 5.0, 1.0)}

    def fit(setting):
        val_acc, train_s, val_s = outcomes[setting["a"]]
        return Candidate(val_acc, train_s, val_s, model=f"model {setting['a']}", settings_tried=setting["b"])

    sel = select(grid_settings({"a": [1, 2, 3, 4], "b": [2]}), fit)
    assert sel.setting == {"a": 2, "b": 2} and sel.best.model == "model 2"  # a tie goes to the first
    assert sel.select_s == pytest.approx(2.0 + 0.25 + 0.5 + 4.0 + 0.25 + 5.0 + 1.0)  # all but the chosen fit
    assert sel.settings_tried == 8
    assert [e["val_acc"] for e in sel.scores] == [0.5, 0.75, 0.75, 0.25] and sel.scores[0] == {"a": 1, "b": 2, "val_acc": 0.5}
    assert grid_settings({"lr": [1, 2], "wd": [0, 3]}) == [{"lr": 1, "wd": 0}, {"lr": 1, "wd": 3}, {"lr": 2, "wd": 0},
                                                   {"lr": 2, "wd": 3}]
    with pytest.raises(ValueError, match="empty"):
        select([], fit)


# ----------------------------------------------------------------------------------------- comparisons
def _record(seed: int, acc: dict[str, float], select_s: dict[str, float]) -> dict:
    rows = []
    for name, a in acc.items():
        metrics = {"test_acc": a, "select_s": select_s.get(name, 0.0), "settings_tried": {"mlp_frozen": 24, "sk_frozen": 54}.get(name, 1)}
        row = {"keys": {"readout": name}, "metrics": metrics, "info": {}}
        if name == "mlp_frozen":
            row["selection"] = [{"lr": 1e-3, "weight_decay": 0.0, "val_acc": 0.5},
                                {"lr": 1e-2, "weight_decay": 0.0, "val_acc": 0.75 if seed else 0.25}]
        rows.append(row)
    return {"seed": seed, "rows": rows, "config": {}}


def test_comparisons_quote_the_tables_numbers_and_paired_differences():
    acc = {"linear_joint": [0.80, 0.82, 0.84], "mlp_frozen": [0.79, 0.80, 0.83], "sk_frozen": [0.81, 0.83, 0.86],
           "knn_frozen": [0.80, 0.80, 0.80]}
    records = [_record(seed, {k: v[seed] for k, v in acc.items()}, {"sk_frozen": 5.0 + seed, "mlp_frozen": 20.0 + 2 * seed})
               for seed in range(3)]
    lines = comparisons(records)
    text = "\n".join(lines)
    _, _, _, table = make_tables.aggregate(records)
    for row in table:  # the accuracies exactly as the table prints them
        shown = make_tables.fmt_stat("test_acc", row["stats"]["test_acc"])
        assert f"{row['keys']['readout']} {shown}" in lines[0]
    assert "sk_frozen 83.33 ± 2.52" in lines[0]
    # Three comparisons (sk_e2e has no row), Holm-adjusted in the order of their p-values: sk − mlp (differences
    # 2, 3, 3 points: t = 8, p = 0.015 < 0.05 / 3) is better; sk − linear (1, 1, 2: t = 4, p = 0.057 > 0.05 / 2) is
    # not, and the step-down stops there (sk − knn: 1, 3, 6).
    from scipy import stats as st
    rows = {line.split("`")[1]: line for line in lines if line.startswith("  - `")}
    assert set(rows) == {"sk_frozen − linear_joint", "sk_frozen − mlp_frozen", "sk_frozen − knn_frozen"}
    assert rows["sk_frozen − mlp_frozen"].endswith("**better**")
    assert rows["sk_frozen − linear_joint"].endswith("**not separated**")
    assert rows["sk_frozen − knn_frozen"].endswith("**not separated**")
    half = st.t.ppf(1 - 0.05 / 2 / 2, 2) * (st.tstd([1, 1, 2]) / 3 ** 0.5)  # its Holm level: 1 − 0.05 / 2
    lo = f"{1.3333 - half:+.2f}".replace("-", "−")
    assert rows["sk_frozen − linear_joint"].startswith(
        f"  - `sk_frozen − linear_joint`: +1.33 [{lo}, +{1.3333 + half:.2f}] points, n = 3 seeds (paired t, Holm over 3")
    assert any(line.startswith("- **Claim**") and "**Verdict: not shown**" in line for line in lines)
    assert "sk_e2e" not in text  # no row, no difference
    assert "mlp_frozen `lr=0.01, weight_decay=0` (2), `lr=0.001, weight_decay=0` (1)" in text
    assert "sk_frozen 6 s for 54 settings" in text and "mlp_frozen 22 s for 24 settings" in text
    assert "SK on frozen features took 0.27× the MLP head's selection time" in text
    assert comparisons([]) == []


# ----------------------------------------------------------------------------------------- the paper's path
def fake_cifar10(root: Path, n_per_batch: int = 12) -> None:
    """CIFAR-10 in torchvision's pickle layout (cifar-10-batches-py/), random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_paper_profile_composes_cifar10_resnet18_for_a_gpu(tmp_path):
    cfg = compose_cfg(tmp_path, "profile=paper", "data=cifar10", "backbone=resnet18")
    assert (cfg.data.name, cfg.backbone.name, cfg.profile, cfg.exp.epochs) == ("cifar10", "resnet18", "paper", 30)
    assert cfg.threads is None and cfg.exp.amp is True
    assert list(cfg.exp.optim.resnet18.lr_grid) == [0.03, 0.1, 0.3] and cfg.exp.optim.resnet18.augment == "crop_flip"


def test_paper_path_runs_offline_on_a_fake_cifar10(tmp_path, monkeypatch, one_thread):
    """profile=smoke data=cifar10 backbone=resnet18, the paper's data and backbone on 40 fit images."""
    import torchvision

    fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # our own files
    run_experiment(compose_cfg(tmp_path, "profile=smoke", "data=cifar10", "backbone=resnet18",
                               f"data.root={tmp_path / 'data'}", "data.download=false", "exp.train_size=null",
                               "exp.val_size=20", "exp.test_size=null", "exp.curves=false", "probe.mlp.epochs=1"))
    rec = only_record(tmp_path)
    assert (rec["config"]["data"]["name"], rec["config"]["backbone"]["name"], rec["profile"]) == ("cifar10", "resnet18", "smoke")
    rows = {r["keys"]["readout"]: r for r in rec["rows"]}
    assert list(rows) == READOUT_ORDER
    assert rows["linear_joint"]["metrics"]["head_params"] == 512 * 10 + 10  # ResNet-18's 512-d features
    assert rows["linear_joint"]["info"]["train_fit"] == "40" and rows["linear_joint"]["info"]["test"] == "12"
    assert [e["lr"] for e in rows["linear_joint"]["selection"]] == [0.03, 0.1]  # the smoke profile's resnet18 grid


# ----------------------------------------------------------------------------------------- parts
def _sk_readout(fit_x, fit_y, val_x, val_y, test_x, test_y):
    """The SK probe as readout 3 runs it: chosen on (val_x, val_y), read out from (fit_x, fit_y)."""
    positions = torch.arange(len(fit_y) + len(val_y))
    task = ProbeTask(torch.cat([fit_x, val_x]), torch.cat([fit_y, val_y]), test_x, test_y, 10,
                     holdout(positions[:len(fit_y)], positions[len(fit_y):]), refit=False)
    return run_probe("sk", task, {**SK, "grid": GRID})


def test_sk_readout_with_the_test_points_as_support_is_exact(digits):
    torch.manual_seed(0)
    backbone = create(SMALL_CNN)
    feats = extract_features(backbone, digits.x_test, batch_size=128, device="cpu", mean_std=digits.mean_std, **QUIET)
    assert len(torch.unique(F.normalize(feats, dim=1), dim=0)) == len(feats)  # no two test points coincide
    res = _sk_readout(feats, digits.y_test, feats[:100], digits.y_test[:100], feats, digits.y_test)
    assert res.test_acc == 1.0


def test_sk_readout_is_chance_level_with_shuffled_support_labels(digits):
    # The readout must depend on the support labels: the exactness above is not a constant 1.
    torch.manual_seed(0)
    feats = extract_features(create(SMALL_CNN), digits.x_test, batch_size=128, device="cpu",
                             mean_std=digits.mean_std, **QUIET)
    y_shuffled = digits.y_test[torch.randperm(len(digits.y_test), generator=torch.Generator().manual_seed(1))]
    res = _sk_readout(feats[:200], y_shuffled[:200], feats[200:], digits.y_test[200:], feats[200:], digits.y_test[200:])
    assert res.test_acc < 0.4
    assert res.settings_tried == 4 and len(res.grid) == 4 and res.val_acc == max(e["val_acc"] for e in res.grid)


def test_joint_training_moves_the_backbone_and_lowers_the_loss(digits):
    torch.manual_seed(0)
    backbone = create(SMALL_CNN)
    before = [p.detach().clone() for p in backbone.parameters()]
    head = torch.nn.Linear(16, 10)
    seen = []
    hist = train_classifier(backbone, head, digits.x_train[:512], digits.y_train[:512], epochs=3, batch_size=64,
                            lr=1e-2, device="cpu", mean_std=digits.mean_std,
                            on_epoch_end=lambda e, entry: seen.append(e) or {"marker": e}, **QUIET)
    assert seen == [1, 2, 3] and [h["marker"] for h in hist] == [1, 2, 3]
    assert all(not torch.equal(b, p) for b, p in zip(before, backbone.parameters()))
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert count_params(head) == 170


@pytest.mark.parametrize("support", ["batch", "memory"])
def test_training_through_the_sk_head_reaches_the_backbone(digits, support):
    torch.manual_seed(0)
    backbone = create(SMALL_CNN)
    head = SKHead(10, k=8, kernel="gaussian", lengthscale="auto", ridge=1e-3, support=support, bank_size=128)
    before = [p.detach().clone() for p in backbone.parameters()]
    # lr 3e-3: at 1e-2 the memory bank goes stale faster than the features move and the loss diverges (seen)
    hist = train_classifier(backbone, head, digits.x_train[:512], digits.y_train[:512], epochs=3, batch_size=64,
                            lr=3e-3, device="cpu", mean_std=digits.mean_std,
                            head_forward=lambda h, f, y: h.training_step(f, y), loss_fn=sk_loss("ce", 10.0), **QUIET)
    assert all(not torch.equal(b, p) for b, p in zip(before, backbone.parameters()))
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["train_acc"] > 0.3
    assert count_params(head) == 0
    if support == "memory":
        assert len(head.bank_x) == 128 and not head.bank_x.requires_grad


# ----------------------------------------------------------------------------------------- command line
def _rows(tmp_path, marker: str) -> tuple[dict, dict]:
    """(rows by readout, the record) of the one run whose command holds ``marker``."""
    recs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs" / "cnn_readout").glob("**/*.json")]
    (rec,) = [r for r in recs if marker in r["command"]]
    return {r["keys"]["readout"]: r for r in rec["rows"]}, rec


def test_sk_keys_on_the_command_line_reach_the_readouts(cli, tmp_path):
    """sk.grid, sk.tune with the fixed setting, and sk.head each change what the run did (profile=smoke
    holds sk.grid.k = [8, 16], kernel [gaussian], and sk.head.k = 16, kernel gaussian)."""
    smoke = ["+exp=cnn_readout", "profile=smoke", "logger=none", "exp.curves=false", "exp.short_linear_control=false"]
    cli(*smoke, "sk.grid.k=[12]", "sk.grid.kernel=[laplacian]")
    cli(*smoke, "sk.tune=false", "sk.k=6", "sk.kernel=imq", "sk.lengthscale=0.7", "sk.head.k=4",
        "sk.head.kernel=laplacian")
    rows, rec = _rows(tmp_path, "sk.grid.k=[12]")
    assert rec["profile"] == "smoke"
    for name in ("sk_frozen", "sk_e2e"):  # chosen on validation from the command line's grid
        assert "k=12, kernel=laplacian," in rows[name]["info"]["chosen"], rows[name]["info"]
    assert rows["sk_e2e"]["info"]["head"].startswith("k=16, kernel=gaussian,")  # the overlay's head
    rows, rec = _rows(tmp_path, "sk.tune=false")
    assert rows["sk_frozen"]["info"]["chosen"] == "k=6, kernel=imq, lengthscale=0.7, ridge=0.001", rows["sk_frozen"]["info"]
    assert rows["sk_e2e"]["info"]["chosen"].endswith("k=6, kernel=imq, lengthscale=0.7, ridge=0.001")
    for name in ("sk_frozen", "sk_e2e"):  # a fixed setting: nothing chosen but readout 4's learning rate
        assert "sk_grid" not in rows[name]
    assert rows["sk_frozen"]["metrics"]["settings_tried"] == 1 and rows["sk_frozen"]["metrics"]["select_s"] == 0
    assert rows["sk_e2e"]["metrics"]["settings_tried"] == 2  # the smoke profile's two learning rates
    assert rows["sk_e2e"]["info"]["head"] == "k=4, kernel=laplacian, lengthscale=auto, ridge=0.001"
    assert rec["config"]["sk"]["head"]["k"] == 4 and "sk_head" not in rec["config"]["exp"]
