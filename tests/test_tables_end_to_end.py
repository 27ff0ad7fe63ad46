"""End to end, for every experiment: a two-seed sweep of its smoke profile, then its table (`make test-slow`).

What a reader of each table is promised (issue 13): every method's selection cost beside its accuracy,
SK's validation accuracy over its whole grid drawn beside the table, and the comparisons the README
quotes written by the experiment's own ``comparisons`` hook. A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import importlib

import pytest

from experiments.core.data import DataNotFoundError, load_fashion_mnist
from experiments.core.records import load_records
from scripts import make_tables

EXPERIMENTS = {"smoke": [], "cnn_readout": [], "vit_probe": [], "transfer": [], "ddqn": ["exp.agent=ddqn,sk"]}
SELECTING = ("cnn_readout", "vit_probe", "transfer")  # experiments whose methods choose hyperparameters on validation


def _fashion_mnist_present() -> bool:
    try:
        load_fashion_mnist(None)
        return True
    except DataNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_sweep_builds_a_complete_table(name, cli, tmp_path):
    if name not in ("smoke", "ddqn") and not _fashion_mnist_present():
        pytest.skip("needs Fashion-MNIST (make data)")
    cli("-m", f"+exp={name}", "profile=smoke", "logger=none", "seed=0,1", *EXPERIMENTS[name])
    runs, out = tmp_path / "results" / "runs", tmp_path / "out"
    records = load_records(runs, name)
    written = make_tables.build(name, runs, out, allow_uncommitted=True)
    md = (out / f"{name}.md").read_text()
    assert (make_tables.PREVIEW_BANNER in md) == bool(make_tables.uncommitted(records))
    assert "## Profile `smoke`" in md and out / f"{name}.csv" in written
    if name not in SELECTING:
        return
    for rec in records:
        for row in rec["rows"]:
            missing = {"select_s", "settings_tried"} - set(row["metrics"])
            assert not missing, f"{name} row {row['keys']} does not report its selection cost {sorted(missing)}"
    grids = [row["sk_grid"] for rec in records for row in rec["rows"] if row.get("sk_grid")]
    assert grids and all({"k", "kernel", "lengthscale_mult", "ridge", "val_acc"} <= set(e) for g in grids for e in g)
    assert (out / f"{name}_sensitivity.png").exists() and f"]({name}_sensitivity.png)" in md
    assert hasattr(importlib.import_module(f"experiments.reports.{name}"), "comparisons") and "### Comparisons" in md
