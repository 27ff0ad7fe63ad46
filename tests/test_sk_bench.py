"""scripts/bench_sk.py --quick: it runs end to end, and the numbers in its reports are consistent.

The quick run's sizes are tiny, so its times say nothing about speed (speed claims live in the full
benchmark's report); what is checked is that every table parses, that every printed ratio is the quotient
of the printed times it names (section 7's against the minimal local KRR included), that memory numbers
are positive and add up, that the GPU section's code runs (on the CPU, through --device-section-on-cpu),
and that each report names its commit, its command and the load average, flagged by the rule.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sk
from experiments.core.records import LOAD_MARGIN, load_contaminated
from scripts.bench.provenance import load_verdict
from scripts.bench.small import FORWARD_TARGET, GRAD_TARGET, dino_vote, minimal_krr
from scripts.bench_sk import SECTIONS, chosen_sections

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


VERDICT = re.compile(r"<= ([0-9.]+): (met|missed|at the target) \(repeats ([0-9.]+)-([0-9.]+)\)")


def check_verdict(ratio: float, cell: str) -> float:
    """A printed target verdict agrees with the printed ratio and the repeats' range (to their rounding);
    returns the target."""
    m = VERDICT.fullmatch(cell.strip())
    assert m, cell
    target, verdict, lo, hi = float(m[1]), m[2], float(m[3]), float(m[4])
    assert lo <= hi
    slack = 1e-3                                  # ratios are printed with 3 decimals
    if verdict == "met":
        assert ratio <= target + slack and hi <= target + slack, cell
    elif verdict == "missed":
        assert ratio > target - slack and lo > target - slack, cell
    else:
        assert not (ratio < target - slack and hi < target - slack), cell
        assert not (ratio > target + slack and lo > target + slack), cell
    return target


def test_target_verdict_on_hand_made_ratios():
    from scripts.bench.timing import ratio_spread, target_verdict, verdict_text
    assert ratio_spread([2.0, 3.0, 1.0], [2.0, 2.0, 2.0]) == (0.5, 1.5)
    assert target_verdict(0.9, (0.8, 0.95), 1.0) == "met"
    assert target_verdict(1.1, (1.05, 1.2), 1.0) == "missed"
    assert target_verdict(0.98, (0.9, 1.04), 1.0) == "at the target"
    assert target_verdict(1.02, (0.97, 1.1), 1.0) == "at the target"
    assert verdict_text(1.1, (1.05, 1.2), 1.15) == "<= 1.15: at the target (repeats 1.050-1.200)"


def test_cpu_report_header_and_sections(reports):
    text, _ = reports
    assert text.startswith("# sk benchmark") and "Quick smoke run" in text
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7."):
        assert section in text


@pytest.mark.parametrize("which", [0, 1], ids=["cpu", "device"])
def test_report_names_commit_command_machine_and_load(reports, which):
    text = reports[which]
    assert re.search(r"^Commit: `[0-9a-f]{40}(-dirty)?`", text, re.M)
    command = re.search(r"^Command: `(.*)`", text, re.M).group(1)
    assert "scripts/bench_sk.py --quick --threads 1 --out " in command
    assert command.endswith("bench.md --device-section-on-cpu")
    if which == 0:
        threads = int(re.search(r"^Machine: CPU .* \((\d+) torch threads of \d+ cores\)", text, re.M).group(1))
        assert threads == 1
    start, end = (tuple(float(v) for v in m.split(", ")) for m in re.search(
        r"^Load average \(1, 5, 15 min\) at start: ([0-9., ]+); at end: ([0-9., ]+?)  $", text, re.M).groups())
    # Flagged at the top exactly when a 1-minute load average passed the benchmark's threads + the margin.
    top = text.split("\nCommit:")[0]
    contaminated = max(start[0], end[0]) > 1 + LOAD_MARGIN
    assert ("**Contaminated timings:" in top) == contaminated and ("Clean timings:" in top) != contaminated
    assert re.search(rf"load average was {start[0]:.2f} at start and {end[0]:.2f} at end", top)


def test_load_rule():
    quiet, busy = (0.4, 0.9, 1.0), (1.6, 0.2, 0.1)
    assert load_contaminated([quiet, quiet], threads=1) is False
    assert load_contaminated([quiet, busy], threads=1) is True          # 1.6 > 1 + 0.5
    assert load_contaminated([busy, busy], threads=2) is False          # 1.6 <= 2 + 0.5
    assert load_contaminated([(1.5, 0, 0)], threads=1) is False         # at the limit: not above it
    assert load_contaminated([quiet, None], threads=1) is None
    assert load_verdict(quiet, busy, 1).startswith("**Contaminated timings:")
    assert load_verdict(quiet, quiet, 1).startswith("Clean timings:")
    assert "unknown" in load_verdict(None, quiet, 1)


def test_sections_by_key():
    assert chosen_sections(None) == SECTIONS
    assert [s.key for s in chosen_sections("7, 1-2")] == ["1-2", "7"]        # the report's order
    with pytest.raises(ValueError, match="unknown section"):
        chosen_sections("8")


def test_minimal_krr_is_exact_krr_with_every_point():
    """The reference of section 7 is right: with k = N it is exact KRR (Gaussian kernel)."""
    g = torch.Generator().manual_seed(0)
    x, z, y = (torch.randn(n, c, generator=g, dtype=torch.float64) for n, c in ((30, 5), (7, 5), (30, 2)))
    f, idx = minimal_krr(z, x, y, k=30, lengthscale=1.5, ridge=1e-2)
    assert torch.allclose(f, sk.exact_krr(z, x, y, kernel="gaussian", lengthscale=1.5, ridge=1e-2), atol=1e-10)
    assert (idx.sort(1).values == torch.arange(30)).all()
    f4, idx4 = minimal_krr(z, x, y, k=4, lengthscale=1.5, ridge=1e-2)
    assert torch.allclose(f4, sk.sparse_krr(z, x, y, k=4, lengthscale=1.5, ridge=1e-2), atol=1e-10)
    assert (idx4 == sk.knn_search(z, x, 4)[1]).all()


def test_dino_vote_is_the_weighted_knn_vote():
    g = torch.Generator().manual_seed(1)
    x, z = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (40, 6))
    labels = torch.randint(0, 3, (40,), generator=g)
    assert torch.allclose(dino_vote(z, x, labels, 3, 5), sk.weighted_knn(z, x, labels, 3, k=5), rtol=1e-4)


def test_section_7_small_calls(reports):
    text, _ = reports
    rows = {r[0]: [num(v) for v in r[1:]] for r in table(text, "| support |")}
    assert list(rows) == ["plain tensor", "PrecomputedSupport", "PrecomputedSupport(distances=True)"]
    assert all(v > 0 for vals in rows.values() for v in vals)
    assert re.search(r"Preparing the support: [0-9]+ us; with its N x N distances [0-9]+ us", text)


def test_section_7_against_the_minimal(reports):
    text, _ = reports
    rows = {r[0]: r[1:] for r in table(text, "| call |")}
    assert list(rows) == ["minimal local KRR", "SK, plain tensor", "SK, PrecomputedSupport",
                          "SK, PrecomputedSupport(distances=True)", "DINO-style vote, hand-written",
                          "sk.weighted_knn"]
    fwd, grad = num(rows["minimal local KRR"][0]), num(rows["minimal local KRR"][3])
    calls = {r[0]: num(r[2]) for r in table(text, "| support |")}           # the 64-query forward column
    for name, r in rows.items():
        assert quotient_ok(num(r[1]), num(r[0]), fwd) and quotient_ok(num(r[4]), num(r[3]), grad), name
        if name.startswith("SK, "):
            assert abs(num(r[0]) - calls[name[4:]]) <= 0.5                 # the same measurement
            for ratio, target in ((num(r[1]), r[2]), (num(r[4]), r[5])):
                check_verdict(ratio, target)
    assert (num(rows["SK, plain tensor"][2]), num(rows["SK, plain tensor"][5])) == (FORWARD_TARGET, GRAD_TARGET)
    same = re.search(r"SK's neighbours differ from the minimal's for ([0-9]+) of 64 queries", text)
    assert same and int(same.group(1)) == 0
    for r in table(text, "| SK path |"):                                   # float32, outputs and gradients ~1
        assert 0 <= num(r[1]) < 1e-4 and 0 <= num(r[2]) < 1e-4, r


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
    verdict = re.search(r"Target (<= [^;]*?\)) at 1 thread", text)
    assert verdict and check_verdict(ratio, verdict.group(1)) == 1.15


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
