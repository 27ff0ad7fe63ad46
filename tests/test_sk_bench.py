"""scripts/bench_sk.py --quick: it runs end to end, and the numbers in its reports are consistent.

The quick run's sizes are tiny, so its times say nothing about speed (speed claims live in the full
benchmark's report); what is checked is that every table parses, that every printed ratio is the quotient
of the printed times it names, that memory numbers are positive and add up, and that the GPU section's
code runs (on the CPU, through --device-section-on-cpu).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.md"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_sk.py"), "--quick", "--threads", "1",
                          "--out", str(out), "--device-section-on-cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in tmp.iterdir()) == ["bench.md", "bench_cuda.md"]   # no temporary files left
    return out.read_text(), (tmp / "bench_cuda.md").read_text()


def table(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    assert rows, header_start
    return rows


def num(cell: str) -> float:
    return float(re.match(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?", cell.strip().lstrip("<= ")).group(0))


def quotient_ok(ratio: float, a: float, b: float, rel: float = 2e-3, abs_: float = 6e-3) -> bool:
    """Printed times have 4 significant digits and ratios 2-3 decimals: allow that rounding only."""
    return abs(ratio - a / b) <= rel * ratio + abs_


def test_cpu_report_header_and_sections(reports):
    text, _ = reports
    assert text.startswith("# sk benchmark") and "Quick smoke run" in text
    assert "Command: `" in text and "torch threads 1" in text
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7."):
        assert section in text


def test_section_7_small_calls(reports):
    text, _ = reports
    rows = {r[0]: [num(v) for v in r[1:]] for r in table(text, "| support |")}
    assert list(rows) == ["plain tensor", "PrecomputedSupport", "PrecomputedSupport(distances=True)"]
    assert all(v > 0 for vals in rows.values() for v in vals)
    assert re.search(r"Preparing the support: [0-9]+ us; with its N x N distances [0-9]+ us", text)


def test_section_1_ratio_is_the_quotient_of_the_times(reports):
    text, _ = reports
    rows = {r[0]: r for r in table(text, "| what |")}
    vote = num(rows["k-NN vote (search + mean of neighbour targets)"][1])
    sk_time = num(rows["SK (search + local solves)"][1])
    for r in rows.values():                                     # medians lie within their repeats
        reps = [num(v) for v in r[2].split(",")]
        assert min(reps) <= num(r[1]) <= max(reps) and min(reps) > 0
    ratio = num(re.search(r"SK / k-NN vote time ratio: ([0-9.]+) at 1 thread", text).group(1))
    assert quotient_ok(ratio, sk_time, vote)


def test_section_2_and_3_derived_columns(reports):
    text, _ = reports
    for r in table(text, "| threads |"):
        square, shaped, search, frac = (num(c) for c in r[1:5])
        assert min(square, shaped, search) > 0
        assert abs(frac - search / square) <= 0.006 + 0.01 * frac
    for r in table(text, "| N | SK s |"):
        sk_s, exact_s, speedup = num(r[1]), num(r[2]), num(r[4])
        assert abs(speedup - exact_s / sk_s) <= 0.051 + 2e-3 * speedup
        assert all(0 <= num(c) < 1.5 for c in r[5:9] if c != "-")   # relative errors


def test_section_4_memory_numbers(reports):
    text, _ = reports
    (row,) = table(text, "| baseline RSS |")
    base, peak, inc = num(row[0]), num(row[1]), num(row[2])
    assert base > 0 and peak >= base and inc >= 0
    assert abs(inc - (peak - base)) <= 0.0015
    assert num(row[4]) > 0                                       # the dense matrix it avoids


def test_section_5_classes_and_training_step(reports):
    text, _ = reports
    times = {(r[0], int(r[1])): num(r[2]) for r in table(text, "| path | C | SK s |")}
    ratio = num(re.search(r"C=1000 / C=10: ([0-9.]+)", text).group(1))
    assert quotient_ok(ratio, times["integer labels", 1000], times["integer labels", 10])
    onehot = num(re.search(r"one-hot / labels at C=1000: ([0-9.]+)", text).group(1))
    assert quotient_ok(onehot, times["one-hot targets", 1000], times["integer labels", 1000], abs_=6e-3)
    check_train_table(text)


def check_train_table(text):
    (row,) = table(text, "| step s |")
    step, forward, search, ratio, fratio = (num(c) for c in row)
    assert min(step, forward, search) > 0
    assert quotient_ok(ratio, step, search) and quotient_ok(fratio, forward, search)


def test_device_section_code_path(reports):
    _, text = reports
    assert text.startswith("# sk benchmark on a GPU") and "not GPU numbers" in text
    rows = table(text, "| M | N | d | k | C |")
    assert len(rows) == 3
    for r in rows:
        vote, sk_time, ratio = num(r[5]), num(r[6]), num(r[7])
        assert quotient_ok(ratio, sk_time, vote)
        assert num(r[9]) > 0 and num(r[10]) > 0                  # search and local solves timed
        assert r[11] == r[12] == "n/a"                           # no device memory counters on the CPU
    cls = {int(r[0]): num(r[1]) for r in table(text, "| C | SK s |")}
    lo, hi = min(cls), max(cls)
    ratio = num(re.search(rf"C={hi} / C={lo}: ([0-9.]+)", text).group(1))
    assert quotient_ok(ratio, cls[hi], cls[lo])
    check_train_table(text)
