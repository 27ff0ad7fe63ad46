"""Shared by the reports: record readers (values by seed, seed counts, probe labels), and comparisons:
paired differences with Holm-adjusted Student-t intervals, their verdicts, and the claim line whose verdict
is computed from them (``experiments.core.stats``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from experiments.core import stats
from experiments.core.format import NO_INTERVAL, plural


def by_seed(records: list[dict], key: Callable[[dict], Any], metric: str = "test_acc") -> dict[Any, dict[Any, float]]:
    """{key(row keys): {seed: the row's metric}} over the records (one record per seed); rows without the
    metric are skipped. Keys keep their order of first appearance (the runner's row order)."""
    out: dict[Any, dict[Any, float]] = {}
    for rec in records:
        for row in rec["rows"]:
            if metric in row["metrics"]:
                out.setdefault(key(row["keys"]), {})[rec.get("seed")] = float(row["metrics"][metric])
    return out


def seed_count(records: list[dict]) -> int:
    return len({rec.get("seed") for rec in records})


def probe_label(name: str) -> str:
    """How tables name a probe (the registry's label: "k-NN", "SK"); the name itself if unregistered."""
    from experiments.core.probes import PROBES

    return PROBES[name].label if name in PROBES else name


# ----------------------------------------------------------------------------------------- comparisons
@dataclass
class Comparison:
    """A paired difference A − B over seeds, its interval (Holm-adjusted within its family) and its verdict
    ("better": A is better than B)."""

    name: str
    interval: "stats.Interval"
    verdict: str
    family: int = 1  # comparisons in its Holm family


def compare_family(named: list[tuple[str, list[float]]]) -> list[Comparison]:
    """Student-t intervals of each (name, per-seed differences), Holm-adjusted over the family, and their
    verdicts. Names must be unique: they are the comparisons' row names in the table (and in the README)."""
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"comparison names must be unique, got {names}")
    adjusted = stats.holm([stats.t_interval(d) for _, d in named])
    return [Comparison(n, iv, stats.verdict(iv), len(named)) for n, iv in zip(names, adjusted)]


def comparison_line(c: Comparison, text: Callable[["stats.Interval"], str], unit: str) -> str:
    """``- `sk_frozen − linear_joint`: +0.26 [−0.09, +0.62] points, n = 10 seeds (paired t, Holm over 5, 95 %
    family-wise): **not separated**`` — the one format of a comparison row (the README quotes these rows
    verbatim). A stratified interval (over environments) counts paired runs instead of seeds."""
    iv = c.interval
    stratified = iv.method.startswith("stratified")
    kind = "stratified paired t over environments" if stratified else "paired t"
    how = f"{kind}, 95 %" if c.family == 1 else f"{kind}, Holm over {c.family}, 95 % family-wise"
    value = text(iv).removesuffix(NO_INTERVAL)  # "(one seed: no CI)" goes after the unit
    note = "" if iv.finite else NO_INTERVAL
    count = plural(iv.n, "paired run" if stratified else "seed")
    return f"- `{c.name}`: {value}{' ' + unit if unit else ''}{note}, n = {count} ({how}): **{c.verdict}**"


CLAIM_VERDICTS = ("held", "contradicted", "not shown")


def claim_verdict(comparisons: list[Comparison], expected: str = "better") -> str:
    """"held" when every comparison the claim rests on has the ``expected`` verdict, "contradicted" when any
    has the opposite one, "not shown" otherwise (intervals across 0, or missing)."""
    opposite = {"better": "worse", "worse": "better"}[expected]
    verdicts = [c.verdict for c in comparisons]
    if verdicts and all(v == expected for v in verdicts):
        return "held"
    if any(v == opposite for v in verdicts):
        return "contradicted"
    return "not shown"


def claim_line(claim: str, comparisons: list[Comparison], expected: str = "better") -> str:
    """``- **Claim** (the paper's): <claim> **Verdict: held**, from `A − B` (better), ...``: computed from the
    named comparisons' verdicts."""
    basis = ", ".join(f"`{c.name}` ({c.verdict})" for c in comparisons) or "no comparison ran"
    return (f"- **Claim** (the paper's): {claim} Tested as: each of {', '.join(f'`{c.name}`' for c in comparisons)} "
            f"{expected}. **Verdict: {claim_verdict(comparisons, expected)}**, from {basis}.")
