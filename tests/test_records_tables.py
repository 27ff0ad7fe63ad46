"""Run records are written atomically; tables aggregate them correctly, are written whole or not at all,
come from committed code only (or are marked as previews), and carry the experiments' comparisons, the
selection cost next to accuracy, and the sensitivity figure."""
import csv
import json
import os
import subprocess
import types
from pathlib import Path

import pytest

from experiments.core import records as records_mod
from experiments.core.records import atomic_write_json, config_id, load_records
from experiments.reports import sensitivity
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


ROOT = Path(__file__).resolve().parents[1]
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _record(seed, acc_sk, acc_knn, started, cid="c1", profile="quick", commit=HEAD):
    return {"experiment": "demo", "profile": profile, "seed": seed, "config_id": cid, "config": {},
            "started_utc": started, "duration_s": 10.0, "git_commit": commit, "command": f"python experiments/run.py +exp=demo seed={seed}",
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

    monkeypatch.setattr(make_tables, "load_report", lambda name: Fig)
    with pytest.raises(KeyboardInterrupt):
        make_tables.build("demo", runs, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") or p.startswith(".")]


def _no_module(monkeypatch, **hooks):
    """Build 'demo' tables with an experiment module that has exactly ``hooks``."""
    monkeypatch.setattr(make_tables, "load_report", lambda name: types.SimpleNamespace(**hooks))


@pytest.mark.parametrize("commit,why", [(HEAD + "-dirty", "uncommitted changes"), ("unknown", "unknown commit"),
                                        ("0123456789abcdef0123456789abcdef01234567", "not in this repository's history")])
def test_records_of_uncommitted_code_are_refused(tmp_path, monkeypatch, capsys, commit, why):
    _no_module(monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "out"
    atomic_write_json(runs / "demo" / "quick" / "clean.json", _record(0, 0.8, 0.5, "2026-01-01"))
    atomic_write_json(runs / "demo" / "quick" / "bad.json", _record(1, 0.9, 0.6, "2026-01-02", commit=commit))
    with pytest.raises(make_tables.UncommittedRecordsError, match=why) as err:
        make_tables.build("demo", runs, out)
    assert "bad.json" in str(err.value) and "clean.json" not in str(err.value)
    assert not out.exists()  # nothing written
    assert make_tables.main(["demo", "--runs", str(runs), "--out", str(out)]) == 1
    assert "bad.json" in capsys.readouterr().err and not out.exists()

    # a preview builds, marked at the top of every file, with the offending record listed
    assert make_tables.main(["demo", "--runs", str(runs), "--out", str(out), "--allow-uncommitted"]) == 0
    md = (out / "demo.md").read_text()
    assert md.splitlines()[2].startswith(f"> **{make_tables.PREVIEW_BANNER}") and "bad.json" in md
    assert make_tables.PREVIEW_BANNER in (out / "demo.csv").read_text().splitlines()[0]
    assert make_tables.PREVIEW_BANNER in (out / "demo.tex").read_text().splitlines()[0]


def test_records_of_committed_code_build_without_banner(tmp_path, monkeypatch):
    _no_module(monkeypatch)
    runs = tmp_path / "runs"
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()[0]  # an ancestor, not HEAD itself
    atomic_write_json(runs / "demo" / "quick" / "a.json", _record(0, 0.8, 0.5, "2026-01-01", commit=first))
    atomic_write_json(runs / "demo" / "quick" / "b.json", _record(1, 0.9, 0.6, "2026-01-02"))
    make_tables.build("demo", runs, tmp_path / "out")
    assert make_tables.PREVIEW_BANNER not in (tmp_path / "out" / "demo.md").read_text()


def test_preview_goes_outside_results_by_default():
    assert not make_tables.PREVIEW_OUT.is_relative_to(ROOT / "results")
    assert "outputs" in subprocess.run(["git", "check-ignore", str(make_tables.PREVIEW_OUT / "x.md")], cwd=ROOT,
                                       capture_output=True, text=True).stdout


def test_no_committed_table_is_a_preview():
    """A table built with --allow-uncommitted must never be committed under results/."""
    marked = [p.name for ext in ("md", "csv", "tex") for p in (ROOT / "results").glob(f"*.{ext}")
              if make_tables.PREVIEW_BANNER in p.read_text()]
    assert not marked, f"preview tables under results/ (rebuild them from committed code): {marked}"


def test_comparisons_hook_writes_each_sections_lines(tmp_path, monkeypatch):
    seen = []

    def comparisons(records):
        seen.append(sorted(r["seed"] for r in records))
        profile = records[0]["profile"]
        return [f"- {profile}: SK − k-NN = {100 * (records[0]['rows'][0]['metrics']['test_acc'] - 0.5):.2f} points"]

    _no_module(monkeypatch, comparisons=comparisons)
    runs = tmp_path / "runs"
    atomic_write_json(runs / "demo" / "quick" / "q0.json", _record(0, 0.8, 0.5, "2026-01-01"))
    atomic_write_json(runs / "demo" / "quick" / "q1.json", _record(1, 0.9, 0.5, "2026-01-02"))
    atomic_write_json(runs / "demo" / "paper" / "p0.json", _record(5, 0.95, 0.5, "2026-01-03", cid="p", profile="paper"))
    make_tables.build("demo", runs, tmp_path / "out")
    md = (tmp_path / "out" / "demo.md").read_text()
    assert seen == [[0, 1], [5]]  # called once per profile, with that profile's records only
    quick, paper = md.split("## Profile `paper`")
    assert "### Comparisons\n\n- quick: SK − k-NN = 30.00 points" in quick
    assert "- paper: SK − k-NN = 45.00 points" in paper and "quick:" not in paper


def test_comparisons_hook_must_return_lines(tmp_path, monkeypatch):
    _no_module(monkeypatch, comparisons=lambda records: [0.3])
    atomic_write_json(tmp_path / "runs" / "demo" / "quick" / "q0.json", _record(0, 0.8, 0.5, "2026-01-01"))
    with pytest.raises(TypeError, match="list of str"):
        make_tables.build("demo", tmp_path / "runs", tmp_path / "out")


def test_settings_of_one_profile_get_their_own_sections(tmp_path, monkeypatch):
    """Two data sets with the same table rows (vit_probe's CIFAR-10 and CIFAR-100 sweeps) are both kept."""
    _no_module(monkeypatch)
    runs = tmp_path / "runs"
    for i, data in enumerate(["cifar10", "cifar100"]):
        rec = _record(0, 0.8 - 0.3 * i, 0.5, f"2026-01-0{i + 1}", profile="paper")
        rec["config"] = {"data": {"name": data}, "backbone": {"name": "timm", "model": "vit_s"}, "exp": {"name": "demo"}}
        atomic_write_json(runs / "demo" / "paper" / f"{data}.json", rec)
    make_tables.build("demo", runs, tmp_path / "out")
    md = (tmp_path / "out" / "demo.md").read_text()
    assert "## Profile `paper`: data cifar10" in md and "## Profile `paper`: data cifar100" in md
    assert "80.00 ± 0.00" in md and "50.00 ± 0.00" in md and "left out" not in md
    rows = list(csv.DictReader(open(tmp_path / "out" / "demo.csv")))
    assert {r["setting"] for r in rows} == {"data=cifar10", "data=cifar100"}


def test_accuracy_then_selection_cost_columns():
    assert make_tables.order_metrics(["fit_s", "select_s", "test_acc", "predict_s", "settings_tried", "val_acc"]) == \
        ["test_acc", "val_acc", "select_s", "settings_tried", "fit_s", "predict_s"]


def test_selection_cost_shown_next_to_accuracy(tmp_path, monkeypatch):
    _no_module(monkeypatch)
    runs = tmp_path / "runs"
    for seed in range(2):
        rec = _record(seed, 0.8, 0.5, f"2026-01-0{seed + 1}")
        rec["rows"][0]["metrics"].update(select_s=6.5 + seed, settings_tried=54)
        rec["rows"][1]["metrics"].update(select_s=0.0, settings_tried=1)
        atomic_write_json(runs / "demo" / "quick" / f"r{seed}.json", rec)
    make_tables.build("demo", runs, tmp_path / "out")
    lines = (tmp_path / "out" / "demo.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| probe"))
    assert header.startswith("| probe | test_acc (%) | select_s | settings_tried | fit_s |")
    sk_row = next(line for line in lines if line.startswith("| sk |"))
    assert "| 7 ± 0.71 | 54 |" in sk_row


def _grid(seed, best_mult=1.0):
    """A 2 kernels x 2 k x 2 multiples x 2 ridges grid; accuracy peaks at k=16, the given multiple, ridge 1e-2."""
    out = []
    for kern in ("gaussian", "laplacian"):
        for k in (8, 16):
            for mult in (0.5, 1.0):
                for ridge in (1e-4, 1e-2):
                    acc = 0.5 + 0.1 * (k == 16) + 0.1 * (mult == best_mult) + 0.05 * (ridge == 1e-2) \
                        - 0.2 * (kern == "laplacian") + 0.01 * seed
                    out.append({"k": k, "kernel": kern, "lengthscale_mult": mult, "ridge": ridge, "val_acc": acc})
    return out


def test_sensitivity_figure_from_the_grid_field(tmp_path, monkeypatch):
    _no_module(monkeypatch)
    runs = tmp_path / "runs"
    for seed in range(3):
        rec = _record(seed, 0.8, 0.5, f"2026-01-0{seed + 1}")
        rec["rows"][0]["sk_grid"] = _grid(seed)
        atomic_write_json(runs / "demo" / "quick" / f"r{seed}.json", rec)
    written = make_tables.build("demo", runs, tmp_path / "out")
    png = tmp_path / "out" / "demo_sensitivity.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (tmp_path / "out" / "demo.md").read_text()
    assert "![SK sensitivity](demo_sensitivity.png)" in md and "mean over 3 seeds" in md
    recs = load_records(runs, "demo")
    curves = sensitivity.sensitivity_curves(sensitivity.sensitivity_data(recs))
    (row,) = curves  # only the SK row has a grid
    assert dict(row) == {"probe": "sk"}
    # mean over seeds (+0.01), best over ridge (+0.05): gaussian, multiple 1.0, k = 8 and 16
    assert curves[row]["gaussian"][1.0] == [(8, pytest.approx(0.66)), (16, pytest.approx(0.76))]
    assert curves[row]["laplacian"][0.5] == [(8, pytest.approx(0.36)), (16, pytest.approx(0.46))]


def test_no_grid_no_sensitivity_figure(tmp_path, monkeypatch):
    _no_module(monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "out"
    atomic_write_json(runs / "demo" / "quick" / "r0.json", _record(0, 0.8, 0.5, "2026-01-01"))
    out.mkdir()
    (out / "demo_sensitivity_old-section.png").write_bytes(b"stale")  # drawn for a section that is gone
    written = make_tables.build("demo", runs, out)
    assert sorted(p.name for p in out.iterdir()) == ["demo.csv", "demo.md", "demo.tex"] == sorted(p.name for p in written)
    assert "sensitivity" not in (out / "demo.md").read_text().lower()


def test_one_sensitivity_figure_per_section(tmp_path, monkeypatch):
    _no_module(monkeypatch)
    runs = tmp_path / "runs"
    for profile in ("quick", "paper"):
        rec = _record(0, 0.8, 0.5, "2026-01-01", cid=profile, profile=profile)
        rec["rows"][0]["sk_grid"] = _grid(0)
        atomic_write_json(runs / "demo" / profile / "r0.json", rec)
    make_tables.build("demo", runs, tmp_path / "out")
    md = (tmp_path / "out" / "demo.md").read_text()
    for profile in ("quick", "paper"):
        assert (tmp_path / "out" / f"demo_sensitivity_{profile}.png").exists()
        assert f"](demo_sensitivity_{profile}.png)" in md


def test_dirty_means_code_changed_not_results(tmp_path):
    """`make table-a table-b`: table a rewrites a tracked results/ file before b's runs record their commit;
    that is not a code change. A changed or new source file is."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.md").write_text("old table\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "results" / "a.md").write_text("new table\n")
    (tmp_path / "results" / "runs").mkdir()
    (tmp_path / "results" / "runs" / "new_record.json").write_text("{}")
    assert records_mod.git_commit(tmp_path) == head
    assert records_mod.git_commit(tmp_path / "results") == head  # from a subfolder too
    (tmp_path / "helper.py").write_text("y = 1\n")  # a new module the code may import: not committed
    assert records_mod.git_commit(tmp_path) == head + "-dirty"
    (tmp_path / "helper.py").unlink()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert records_mod.git_commit(tmp_path) == head + "-dirty"


def test_extra_figures_hook_writes_and_links_each_figure(tmp_path, monkeypatch):
    drawn = []

    def extra_figures(records):
        def draw(path):
            drawn.append(len(records))
            path.write_bytes(b"\x89PNG fake")
        return [("demo_profile_quick.png", draw)]

    _no_module(monkeypatch, extra_figures=extra_figures)
    runs = tmp_path / "runs"
    atomic_write_json(runs / "demo" / "quick" / "r0.json", _record(0, 0.8, 0.5, "2026-01-01"))
    make_tables.build("demo", runs, tmp_path / "out")
    assert drawn == [1] and (tmp_path / "out" / "demo_profile_quick.png").read_bytes() == b"\x89PNG fake"
    assert "![demo_profile_quick](demo_profile_quick.png)" in (tmp_path / "out" / "demo.md").read_text()

    # a name that would land outside the table's folder, or not be recognisable as the table's, is refused
    _no_module(monkeypatch, extra_figures=lambda records: [("../evil.png", lambda p: None)])
    with pytest.raises(ValueError, match="demo_\\*.png"):
        make_tables.build("demo", runs, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
