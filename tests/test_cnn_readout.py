"""CNN readout experiment (issue 4) and the shared training helper, on tiny data (digits)."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from experiments.backbones import create
from experiments.cnn_readout import READOUT_ORDER, SKHead, make_figure, sk_loss, sk_readout
from experiments.core.data import load_digits
from experiments.core.train import count_params, crop_flip, extract_features, train_classifier

SMALL_CNN = OmegaConf.create({"name": "small_cnn", "in_channels": 1, "width": 8, "feature_dim": 16})
SK = {"normalize": True, "backend": "torch", "k": 8, "kernel": "gaussian", "lengthscale": "auto", "ridge": 1e-3}
GRID = {"k": [4, 8], "kernel": ["gaussian", "laplacian"], "lengthscale_mult": [1.0], "ridge": [1e-4]}
QUIET = dict(progress=lambda it, **kw: it)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_end_to_end_run_gives_every_readout_with_costs_and_curves(cli, tmp_path):
    cli("+exp=cnn_readout", "data=digits", "logger=none", "seed=1", "exp.train_size=400", "exp.val_size=100",
        "exp.test_size=120", "exp.epochs=2", "exp.sk_epochs_frac=0.5", "exp.mlp.epochs=2", "exp.eval_batch_size=256",
        "backbone.width=8", "backbone.feature_dim=16",
        "sk.grid={k:[4,8],kernel:[gaussian],lengthscale_mult:[1.0],ridge:[1e-4]}")
    (path,) = (tmp_path / "results" / "runs" / "cnn_readout" / "quick").glob("*.json")
    rec = json.loads(path.read_text())
    rows = {r["keys"]["readout"]: r for r in rec["rows"]}
    assert list(rows) == READOUT_ORDER
    for name, r in rows.items():
        assert 0.0 <= r["metrics"]["test_acc"] <= 1.0, name
        assert {"test_acc", "head_params", "train_epochs", "train_s"} <= set(r["metrics"])
        assert r["info"]["train_fit"] == "300" and r["info"]["val"] == "100" and r["info"]["test"] == "120"
    assert rows["linear_joint"]["metrics"]["head_params"] == 16 * 10 + 10
    assert rows["mlp_frozen"]["metrics"]["head_params"] == 16 * 256 + 256 + 256 * 10 + 10
    assert rows["sk_frozen"]["metrics"]["head_params"] == 0 and rows["sk_frozen"]["metrics"]["train_s"] == 0
    assert rows["linear_joint"]["metrics"]["train_epochs"] == 2 and rows["sk_e2e"]["metrics"]["train_epochs"] == 1
    assert rows["linear_joint"]["metrics"]["train_s"] > 0 and rows["sk_e2e"]["metrics"]["train_s"] > 0
    for name in ("sk_frozen", "sk_e2e"):  # hyperparameters chosen on validation, from the grid given
        chosen = rows[name]["info"]["chosen"]
        assert "kernel=gaussian" in chosen and ("k=4" in chosen or "k=8" in chosen)
        assert 0.0 <= rows[name]["metrics"]["val_acc"] <= 1.0
    assert rec["curves"]["linear_joint"]["x"] == [1, 2] and rec["curves"]["sk_e2e"]["x"] == [1]
    assert rec["curves"]["linear_joint"]["y"][-1] == pytest.approx(rows["linear_joint"]["metrics"]["test_acc"])
    make_figure([rec, rec], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_sk_readout_with_the_test_points_as_support_is_exact(digits):
    torch.manual_seed(0)
    backbone = create(SMALL_CNN)
    feats = extract_features(backbone, digits.x_test, batch_size=128, device="cpu", mean_std=digits.mean_std, **QUIET)
    assert len(torch.unique(F.normalize(feats, dim=1), dim=0)) == len(feats)  # no two test points coincide
    res = sk_readout(feats, digits.y_test, feats[:100], digits.y_test[:100], feats, digits.y_test, 10, grid=GRID, **SK)
    assert res.test_acc == 1.0


def test_sk_readout_is_chance_level_with_shuffled_support_labels(digits):
    # The readout must depend on the support labels: the exactness above is not a constant 1.
    torch.manual_seed(0)
    feats = extract_features(create(SMALL_CNN), digits.x_test, batch_size=128, device="cpu",
                             mean_std=digits.mean_std, **QUIET)
    y_shuffled = digits.y_test[torch.randperm(len(digits.y_test), generator=torch.Generator().manual_seed(1))]
    res = sk_readout(feats[:200], y_shuffled[:200], feats[200:], digits.y_test[200:], feats[200:],
                     digits.y_test[200:], 10, grid=GRID, **SK)
    assert res.test_acc < 0.4


@pytest.mark.parametrize("augment", [None, crop_flip(1)])
def test_frozen_backbone_stays_frozen_while_a_head_trains(digits, augment):
    torch.manual_seed(0)
    backbone = create(SMALL_CNN)
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    head_before = [p.detach().clone() for p in head.parameters()]
    hist = train_classifier(backbone, head, digits.x_train[:256], digits.y_train[:256], epochs=2, batch_size=64,
                            lr=1e-2, device="cpu", mean_std=digits.mean_std, augment=augment,
                            freeze_backbone=True, **QUIET)
    after = backbone.state_dict()
    for k, v in before.items():  # weights and batch-norm statistics alike
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(a, p) for a, p in zip(head_before, head.parameters()))
    assert all(p.requires_grad for p in backbone.parameters()) and backbone.training  # flags and mode restored
    assert len(hist) == 2 and hist[1]["train_s"] >= hist[0]["train_s"] > 0


def test_joint_training_moves_the_backbone_and_lowers_the_loss(digits):
    torch.manual_seed(0)
    backbone = create(SMALL_CNN)
    before = [p.detach().clone() for p in backbone.parameters()]
    head = nn.Linear(16, 10)
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
        assert rows[name]["info"]["chosen"].startswith("k=12, kernel=laplacian,"), rows[name]["info"]
    assert rows["sk_e2e"]["info"]["head"].startswith("k=16, kernel=gaussian,")  # the overlay's head
    rows, rec = _rows(tmp_path, "sk.tune=false")
    for name in ("sk_frozen", "sk_e2e"):  # the fixed setting, not the grid
        assert rows[name]["info"]["chosen"] == "k=6, kernel=imq, lengthscale=0.7, ridge=0.001", rows[name]["info"]
    assert rows["sk_e2e"]["info"]["head"] == "k=4, kernel=laplacian, lengthscale=auto, ridge=0.001"
    assert rec["config"]["sk"]["head"]["k"] == 4 and "sk_head" not in rec["config"]["exp"]
