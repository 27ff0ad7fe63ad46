"""The ViT probing table's report (experiments/vit_probe.py runs it): comparisons and the figure.

- (linear − SK) and (SK − k-NN) test accuracy over the probed (block, token) feature sets: the range of
  the per-feature-set means over seeds, in points;
- per probe, the validation-selected headline: in each seed the (block, token) with the best validation
  accuracy (ties: the first in row order, as the run's summary), its test accuracy mean ± std over seeds,
  and which feature sets were chosen;
- paired differences of those headlines (SK − linear, SK − k-NN) with Holm-adjusted Student-t intervals and
  their verdicts; the paper's claim with its computed verdict;
- SK's selection cost against the linear probe's: seconds spent choosing hyperparameters on validation
  (``select_s``), summed over the feature sets, mean over seeds.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path

from experiments.core.format import interval_points, plural, points
from experiments.core.stats import mean_std, paired_differences
from experiments.reports.common import claim_line, compare_family, comparison_line, probe_label


def _probes(records: list[dict]) -> list[str]:
    """The probes in the runner's row order."""
    return list(dict.fromkeys(row["keys"]["probe"] for rec in records for row in rec["rows"]))


def _selected(record: dict, probe: str) -> dict | None:
    """The row of ``probe`` at the (block, token) with the best validation accuracy (ties: the first)."""
    mine = [r for r in record["rows"] if r["keys"]["probe"] == probe]
    return max(mine, key=lambda r: r["metrics"].get("val_acc", -1.0)) if mine else None


def _feature_means(records: list[dict]) -> dict[tuple, dict[str, float]]:
    """{(block, token): {probe: test accuracy, mean over the records (seeds)}}."""
    vals: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        for row in rec["rows"]:
            k = row["keys"]
            vals[(int(k["block"]), str(k["token"]))][k["probe"]].append(row["metrics"]["test_acc"])
    return {fs: {p: sum(v) / len(v) for p, v in per.items()} for fs, per in vals.items()}


def _difference_range(means: dict[tuple, dict[str, float]], a: str, b: str) -> str | None:
    diffs = {fs: m[a] - m[b] for fs, m in means.items() if a in m and b in m}
    if not diffs:
        return None
    lo, hi = min(diffs, key=diffs.get), max(diffs, key=diffs.get)
    return (f"{points(diffs[lo], False)}–{points(diffs[hi], False)} (smallest at block {lo[0]} {lo[1]}, "
            f"largest at block {hi[0]} {hi[1]})")


def comparisons(records: list[dict]) -> list[str]:
    """What the README quotes from one section of the table (``scripts/make_tables.py`` calls it)."""
    if not records:
        return []
    means = _feature_means(records)
    n = len(records)
    blocks = sorted({b for b, _ in means})
    tokens = sorted({t for _, t in means})
    where = (f"the {len(means)} feature sets ({plural(len(blocks), 'block')} × {plural(len(tokens), 'token')}), "
             f"each the mean over {plural(n, 'seed')}")
    lines = []
    for a, b in (("linear", "sk"), ("sk", "knn")):
        span = _difference_range(means, a, b)
        if span:
            lines.append(f"- {probe_label(a)} − {probe_label(b)} test accuracy over {where}, in points: {span}")
    heads = []
    for probe in _probes(records):
        picked = [_selected(rec, probe) for rec in records]
        picked = [p for p in picked if p is not None]
        if not picked:
            continue
        accs = [p["metrics"]["test_acc"] for p in picked]
        chosen = Counter(f"block {p['keys']['block']} {p['keys']['token']}" for p in picked)
        which = ", ".join(f"{c} in {k} of {len(accs)}" for c, k in chosen.most_common())
        mean, std = mean_std(accs)
        heads.append(f"{probe_label(probe)} {100 * mean:.2f} ± {100 * std:.2f} % ({which})")
    if heads:
        lines.append(f"- Validation-selected headline (each seed's (block, token) with the best validation accuracy; "
                     f"test accuracy mean ± std over {plural(n, 'seed')}): " + "; ".join(heads))
    return lines + _verdicts(records) + _costs(records, len(means))


CLAIM = "SK probes find information in frozen transformer features that a linear probe misses."


def _verdicts(records: list[dict]) -> list[str]:
    """Paired per-seed differences of the validation-selected headlines (each probe at the feature set its own
    validation accuracy picked), Holm-adjusted, and the claim's verdict."""
    picked = {p: {rec.get("seed"): _selected(rec, p)["metrics"]["test_acc"] for rec in records if _selected(rec, p)}
              for p in _probes(records)}
    pairs = [(a, b) for a, b in (("sk", "linear"), ("sk", "knn")) if picked.get(a) and picked.get(b)]
    family = compare_family([(f"{a} − {b} (selected)", paired_differences(picked[a], picked[b])[1]) for a, b in pairs])
    if not family:
        return []
    lines = ["- Paired differences of the validation-selected headlines (same seed, same probe data), in points, "
             "with Student-t intervals over seeds, Holm-adjusted:"]
    lines += ["  " + comparison_line(c, interval_points, "points") for c in family]
    return lines + [claim_line(CLAIM, [c for c in family if c.name.startswith("sk − linear")])]


def _costs(records: list[dict], feature_sets: int) -> list[str]:
    cost = {}
    for probe in ("sk", "linear"):
        totals = [sum(r["metrics"].get("select_s", 0.0) for r in rec["rows"] if r["keys"]["probe"] == probe)
                  for rec in records]
        tried = [r["metrics"].get("settings_tried", 1) for rec in records for r in rec["rows"] if r["keys"]["probe"] == probe]
        if tried:
            cost[probe] = (statistics.fmean(totals), Counter(int(t) for t in tried).most_common(1)[0][0])
    if len(cost) < 2 or cost["linear"][0] <= 0:
        return []
    (sk_s, sk_n), (lin_s, lin_n) = cost["sk"], cost["linear"]
    return [f"- Selection cost (seconds choosing hyperparameters on the validation split, summed over the "
            f"{feature_sets} feature sets, mean over seeds): SK {sk_s:.3g} s ({sk_n} settings a feature set), "
            f"linear {lin_s:.3g} s ({lin_n} values of C): SK {sk_s / lin_s:.2f}× the linear probe's"]


def make_figure(records: list[dict], path: Path) -> None:
    """Test accuracy against depth (mean ± std over seeds), one line per probe and token type; one
    column of panels per profile, fitting seconds (log scale) underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_profile: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_profile[rec.get("profile", "default")].append(rec)
    profiles = sorted(by_profile, key=lambda p: (p != "quick", p != "paper", p))
    fig, axes = plt.subplots(2, len(profiles), figsize=(6 * len(profiles), 7), squeeze=False, sharex="col")
    for col, profile in enumerate(profiles):
        _draw_profile(axes[:, col], by_profile[profile], profile)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _draw_profile(axes, recs: list[dict], profile: str) -> None:
    colors = {"linear": "tab:blue", "knn": "tab:green", "sk": "tab:red"}
    styles = {"cls": "-", "mean": "--"}
    vals: dict[tuple, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for rec in recs:
        for row in rec["rows"]:
            k = row["keys"]
            vals[(k["probe"], k["token"])][int(k["block"])].append((row["metrics"]["test_acc"], row["metrics"]["fit_s"]))
    for (probe, token), per_block in sorted(vals.items()):
        xs = sorted(per_block)
        for ax, j in ((axes[0], 0), (axes[1], 1)):
            mean = [sum(v[j] for v in per_block[b]) / len(per_block[b]) for b in xs]
            std = [mean_std([v[j] for v in per_block[b]])[1] for b in xs]
            if j == 0:
                mean, std = [100 * m for m in mean], [100 * s for s in std]
            elif not any(m > 0 for m in mean):
                continue  # a probe that fits nothing: no point on a log axis
            ax.plot(xs, mean, styles.get(token, ":"), color=colors.get(probe), marker="o", ms=3,
                    label=f"{probe} ({token})")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors.get(probe), alpha=0.12, lw=0)
    seeds = len({r.get("seed") for r in recs})
    model = recs[0]["config"]["backbone"].get("model") or recs[0]["config"]["backbone"]["name"]
    axes[0].set_title(f"{model} on {recs[0]['config']['data']['name']} ({profile}, {plural(seeds, 'seed')})")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("fit seconds (tuning + fit)")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("block")
    axes[0].legend(fontsize=8, ncol=3)
    for ax in axes:
        ax.grid(alpha=0.3)
