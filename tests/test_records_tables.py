"""Run records are written atomically; tables aggregate them correctly and are written whole or not at all."""
import csv
import json
import os

import pytest

from experiments.core import records as records_mod
from experiments.core.records import atomic_write_json, config_id, load_records
from scripts import make_tables


def test_interrupted_record_write_leaves_no_broken_record(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "x" / "rec.json"
    atomic_write_json(path, {"ok": 1})

    def boom(fd):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(records_mod.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"ok": 2, "big": list(range(10000))})
    assert json.loads(path.read_text()) == {"ok": 1}  # the old record is intact
    assert [p.name for p in path.parent.iterdir()] == ["rec.json"]  # no temporary file left


def test_unreadable_record_is_skipped(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "bad.json").write_text('{"rows": [')
    atomic_write_json(tmp_path / "e" / "good.json", {"rows": []})
    recs = load_records(tmp_path, "e")
    assert len(recs) == 1 and "bad.json" in capsys.readouterr().err


def test_config_id_ignores_seed_and_paths_but_not_settings():
    base = {"seed": 0, "paths": {"root": "/a"}, "sk": {"k": 8}, "exp": {"name": "e"}}
    assert config_id(base) == config_id({**base, "seed": 5, "paths": {"root": "/b"}})
    assert config_id(base) != config_id({**base, "sk": {"k": 16}})
    moved = {**base, "data": {"name": "fm", "root": "/elsewhere"}}
    assert config_id(moved) == config_id({**base, "data": {"name": "fm", "root": "/here"}})


def _record(seed, acc_sk, acc_knn, started, cid="c1", profile="quick"):
    return {"experiment": "demo", "profile": profile, "seed": seed, "config_id": cid, "config": {},
            "started_utc": started, "duration_s": 10.0, "git_commit": "abc", "command": f"python experiments/run.py +exp=demo seed={seed}",
            "machine": {"cpu": "Test CPU", "torch_threads": 2, "cpu_count": 2},
            "rows": [{"keys": {"probe": "sk"}, "metrics": {"test_acc": acc_sk, "fit_s": 1.0}, "info": {"chosen": "k=8"}},
                     {"keys": {"probe": "knn"}, "metrics": {"test_acc": acc_knn, "fit_s": 0.0}}]}


def test_tables_give_right_means_stds_and_counts(tmp_path):
    runs = tmp_path / "runs"
    for seed, (a, b) in enumerate([(0.8, 0.5), (0.9, 0.6), (1.0, 0.7)]):
        atomic_write_json(runs / "demo" / "quick" / f"r{seed}.json", _record(seed, a, b, f"2026-01-0{seed + 1}"))
    # an older configuration of the same profile must not be averaged in
    atomic_write_json(runs / "demo" / "quick" / "old.json", _record(9, 0.0, 0.0, "2025-01-01", cid="old"))
    # a rerun of seed 0 with the same configuration replaces the first run of seed 0
    atomic_write_json(runs / "demo" / "quick" / "r0_old.json", _record(0, 0.1, 0.1, "2025-12-31"))
    # a configuration with other rows (another agent run as its own job) is kept beside the newest
    other = _record(0, 0.7, 0.7, "2025-06-01", cid="agent2")
    other["rows"] = [{"keys": {"probe": "mlp"}, "metrics": {"test_acc": 0.7}}]
    atomic_write_json(runs / "demo" / "quick" / "other.json", other)
    written = make_tables.build("demo", runs, tmp_path / "out")
    assert {p.suffix for p in written} == {".md", ".csv", ".tex"}
    rows = {r["probe"]: r for r in csv.DictReader(open(tmp_path / "out" / "demo.csv"))}
    assert float(rows["sk"]["test_acc_mean"]) == pytest.approx(0.9)
    assert float(rows["sk"]["test_acc_std"]) == pytest.approx(0.1)
    assert rows["sk"]["n_seeds"] == "3" and rows["sk"]["chosen"] == "k=8"
    assert float(rows["knn"]["test_acc_mean"]) == pytest.approx(0.6)
    assert float(rows["mlp"]["test_acc_mean"]) == pytest.approx(0.7) and rows["mlp"]["n_seeds"] == "1"
    assert list(rows).index("sk") < list(rows).index("knn")  # rows keep the experiment's order
    md = (tmp_path / "out" / "demo.md").read_text()
    assert "90.00 ± 10.00" in md and "Test CPU" in md and "+exp=demo" in md
    assert "2 older record(s) left out" in md
    tex = (tmp_path / "out" / "demo.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex


def test_failed_table_build_leaves_previous_table(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    atomic_write_json(runs / "demo" / "quick" / "r0.json", _record(0, 0.8, 0.5, "2026-01-01"))
    out = tmp_path / "out"
    make_tables.build("demo", runs, out)
    before = {p.name: p.read_text() for p in out.iterdir()}
    atomic_write_json(runs / "demo" / "quick" / "r1.json", _record(1, 0.2, 0.5, "2026-01-02"))

    class Fig:
        @staticmethod
        def make_figure(records, path):
            raise KeyboardInterrupt("interrupted while drawing")

    monkeypatch.setattr(make_tables, "_experiment_module", lambda name: Fig)
    with pytest.raises(KeyboardInterrupt):
        make_tables.build("demo", runs, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") or p.startswith(".")]
