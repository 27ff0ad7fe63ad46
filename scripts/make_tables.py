"""Build results/<table>.{md,csv,tex} (and the experiment's figures) from run records.

    python scripts/make_tables.py                 # every experiment that has records
    python scripts/make_tables.py cnn_readout     # one table
    python scripts/make_tables.py cnn_readout --allow-uncommitted   # a marked preview, in outputs/tables-preview/

Records are read from results/runs/<experiment>/<profile>/*.json. A table is built only from records
written by committed code: each record's ``git_commit`` must be clean (no ``-dirty``), known, and in this
repository's history, so that anyone can check out the code that produced it. Otherwise the build stops
and lists the offending records; ``--allow-uncommitted`` builds anyway, into ``outputs/tables-preview/``
unless ``--out`` says otherwise, with a PREVIEW banner at the top of every file (a test fails if such a
table is ever committed under results/).

A table has one section per profile, and within a profile one per setting (data set, backbone, input size)
when its records hold more than one. Within a section only the records of the most recent configuration
(the newest ``config_id``) of each table row are aggregated, so that runs of different settings are never
averaged together; older ones are counted in the header. Each row's metrics become ``mean ± std`` over
seeds with their number ``n``; accuracy columns come first, then the selection cost (``select_s``,
``settings_tried``), then the rest.

Per section the experiment module may add (see docs/INTERFACES.md, "Tables"):
``comparisons(records) -> list[str]`` (Markdown lines under "Comparisons"), ``summarize(records)``
(a table of confidence intervals), and every row that carries ``sk_grid`` is drawn in a sensitivity figure
``<experiment>_sensitivity*.png``. ``make_figure(records, path)`` draws ``<experiment>.png`` from all
records of the table; ``extra_figures(records) -> [(file name, draw(path)), ...]`` adds more figures
(for example ddqn's performance profiles), each linked from the table. All files of a table are written to temporary files first and renamed at the end:
a table is written whole or not at all.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import math
import re
import statistics
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.core.atomic import atomic_write  # noqa: E402
from experiments.core.records import config_id, describe_machine, load_records, uncommitted_reason  # noqa: E402

PREVIEW_BANNER = "PREVIEW — not from committed code"
PREVIEW_OUT = ROOT / "outputs" / "tables-preview"
# Selection cost of a method, shown right after the accuracy columns: seconds spent choosing its
# hyperparameters on validation, and the number of settings it tried there (1 for a fixed setting).
COST_METRICS = ("select_s", "settings_tried")
# What tells two settings of one profile apart (config paths); a section per distinct combination.
SETTING_FIELDS = {"data": ("data", "name"), "backbone": ("backbone", "name"), "model": ("backbone", "model"),
                  "img_size": ("backbone", "img_size")}
SENSITIVITY_MAX_ROWS = 12  # feature sets drawn in one sensitivity figure (evenly spaced beyond that)


class UncommittedRecordsError(RuntimeError):
    """Some records behind a table were not written by committed code."""


@dataclass
class Section:
    """The records of one table section: a profile, and a setting when the profile holds several."""

    profile: str
    setting: dict[str, str]  # the fields that tell this section apart from its profile's others; {} if alone
    records: list[dict]
    ignored: int

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.setting.items())
        return f"Profile `{self.profile}`" + (f": {extra}" if extra else "")

    @property
    def slug(self) -> str:
        parts = [self.profile] + [str(v) for v in self.setting.values()]
        return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(parts)).strip("-")


def _setting_of(rec: dict) -> dict[str, str]:
    cfg = rec.get("config") or {}
    out = {}
    for name, path in SETTING_FIELDS.items():
        node: Any = cfg
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        out[name] = "" if node is None else str(node)
    return out


def sections(records: list[dict]) -> list[Section]:
    """Group records by profile, then by setting (only where a profile holds several), and keep in each
    group the newest configuration of every table row (``select_latest``)."""
    by_profile: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_profile[r.get("profile", "default")].append(r)
    order = ["quick", "paper"]
    out = []
    for profile in sorted(by_profile, key=lambda p: (order.index(p) if p in order else 9, p)):
        recs = by_profile[profile]
        settings = [_setting_of(r) for r in recs]
        varying = [f for f in SETTING_FIELDS if len({s[f] for s in settings}) > 1]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r, s in zip(recs, settings):
            groups[tuple((f, s[f]) for f in varying)].append(r)
        for key in sorted(groups):
            chosen, ignored = select_latest(groups[key])
            out.append(Section(profile, {f: v for f, v in key if v}, chosen, ignored))
    return out


def select_latest(recs: list[dict]) -> tuple[list[dict], int]:
    """The records to aggregate among ``recs`` (one profile and setting), and how many are left out.

    A configuration (``config_id``) is superseded when a newer configuration produces any of the same
    table rows: its numbers are out of date. Configurations whose rows differ (for example the two agents
    of a comparison, run as separate jobs) are kept side by side. A rerun of the same configuration and
    seed replaces the older record.
    """
    newest: dict[str, str] = {}
    row_keys: dict[str, set] = defaultdict(set)
    for r in recs:
        cid = r["config_id"]
        newest[cid] = max(newest.get(cid, ""), r.get("started_utc", ""))
        row_keys[cid] |= {tuple(sorted((k, str(v)) for k, v in row["keys"].items())) for row in r["rows"]}
    kept: list[str] = []
    for cid in sorted(newest, key=newest.get, reverse=True):
        if not any(row_keys[cid] & row_keys[k] for k in kept):
            kept.append(cid)
    latest: dict[tuple, dict] = {}
    for r in recs:
        key = (r["config_id"], r.get("seed"))
        if r["config_id"] in kept and (key not in latest or r.get("started_utc", "") > latest[key].get("started_utc", "")):
            latest[key] = r
    chosen = sorted(latest.values(), key=lambda r: (r.get("started_utc", ""), r.get("_path", "")))
    return chosen, len(recs) - len(chosen)


def uncommitted(records: list[dict], root: Path = ROOT) -> list[tuple[str, str]]:
    """(record path, why) for each record whose code cannot be checked out from ``root``'s history."""
    reasons: dict[str, str | None] = {}
    out = []
    for r in records:
        commit = str(r.get("git_commit") or "unknown")
        if commit not in reasons:
            reasons[commit] = uncommitted_reason(commit, root)
        if reasons[commit]:
            out.append((_rel(r.get("_path", "?")), reasons[commit]))
    return out


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def order_metrics(metrics: list[str]) -> list[str]:
    """Accuracy first, then the selection cost, then the rest, each in the experiment's order."""
    acc = [m for m in metrics if _is_pct(m)]
    cost = [m for m in COST_METRICS if m in metrics]
    return acc + cost + [m for m in metrics if m not in acc and m not in cost]


def aggregate(records: list[dict]) -> tuple[list[str], list[str], list[str], list[dict[str, Any]]]:
    """Group rows by their keys over records (seeds): (key columns, metric names, info names, rows)."""
    key_cols: list[str] = []
    metric_names: list[str] = []
    info_names: list[str] = []
    groups: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        for row in rec["rows"]:
            for k in row["keys"]:
                if k not in key_cols:
                    key_cols.append(k)
            for m in row["metrics"]:
                if m not in metric_names:
                    metric_names.append(m)
            for i in row.get("info", {}):
                if i not in info_names:
                    info_names.append(i)
    for rec in records:
        for row in rec["rows"]:
            key = tuple(_key(row["keys"].get(k)) for k in key_cols)
            g = groups.setdefault(key, {"keys": {k: row["keys"].get(k) for k in key_cols},
                                        "metrics": defaultdict(list), "info": defaultdict(list), "seeds": set()})
            g["seeds"].add(rec.get("seed"))
            for m, v in row["metrics"].items():
                if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    g["metrics"][m].append(float(v))
            for i, v in row.get("info", {}).items():
                g["info"][i].append(str(v))
    out = []
    for g in groups.values():
        stats = {}
        for m in metric_names:
            vals = g["metrics"].get(m, [])
            if vals:
                stats[m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
        info = {i: Counter(g["info"][i]).most_common(1)[0][0] for i in info_names if g["info"].get(i)}
        out.append({"keys": g["keys"], "stats": stats, "info": info, "n": len(g["seeds"])})
    return key_cols, order_metrics(metric_names), info_names, out


def _key(v):
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def _is_pct(metric: str) -> bool:
    return "acc" in metric


def fmt_stat(metric: str, stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, _ = stat
    if _is_pct(metric):
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    if abs(mean) >= 1000 or (float(mean).is_integer() and float(std).is_integer()):  # counts
        return f"{mean:.0f} ± {std:.0f}" if std else f"{mean:.0f}"
    return f"{mean:.3g} ± {std:.2g}"


def header_name(metric: str) -> str:
    return f"{metric} (%)" if _is_pct(metric) else metric


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def latex_escape(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for a, b in [("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$"),
                 ("±", r"$\pm$"), ("–", "--"), ("—", "---"), ("→", r"$\to$")]:
        s = s.replace(a, b)
    return s


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    cols = "l" * len(header)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(str(c)) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def provenance(recs: list[dict], ignored: int) -> list[str]:
    seeds = sorted({r.get("seed") for r in recs}, key=str)
    commands = sorted({_strip_seed(r.get("command", "")) for r in recs})
    machines = sorted({describe_machine(r.get("machine", {})) for r in recs})
    commits = sorted({_short_commit(r.get("git_commit", "unknown")) for r in recs})
    dates = sorted(r.get("started_utc", "") for r in recs)
    total = sum(r.get("duration_s", 0.0) for r in recs)
    configs = ", ".join(f"`{c}`" for c in sorted({r["config_id"] for r in recs}))
    lines = [f"- Runs: {len(recs)} (seeds {', '.join(map(str, seeds))}), config {configs}, "
             f"{dates[0]} to {dates[-1]} UTC, {total / 60:.1f} min of run time in all"]
    lines += [f"- Command (one run per seed): `{c}`" for c in commands]
    lines += [f"- Machine: {m}" for m in machines]
    lines.append(f"- Code: git {', '.join(commits)}")
    if ignored:
        lines.append(f"- {ignored} older record(s) left out: superseded by a newer configuration of the same rows, or by a rerun of the same seed")
    return lines


def _short_commit(commit: str) -> str:
    """First 12 hex digits, keeping the mark of uncommitted changes."""
    return commit[:12] + (" (with uncommitted changes)" if commit.endswith("-dirty") else "")


def _strip_seed(command: str) -> str:
    return " ".join(p for p in command.split() if not p.startswith("seed="))


# ------------------------------------------------------------------------------------------ sensitivity
def sensitivity_data(records: list[dict]) -> dict[tuple, dict[tuple, list[float]]]:
    """{row keys: {(kernel, k, line value, ridge): [val_acc of each record]}} of the rows with ``sk_grid``.

    The line value is the entry's ``lengthscale_mult`` (or its ``lengthscale`` when the grid gives no
    multiple, or None).
    """
    out: dict[tuple, dict[tuple, list[float]]] = {}
    for rec in records:
        for row in rec.get("rows", []):
            grid = row.get("sk_grid")
            if not grid:
                continue
            cells = out.setdefault(tuple(row["keys"].items()), defaultdict(list))
            for e in grid:
                line = e.get("lengthscale_mult", e.get("lengthscale"))
                cells[(str(e["kernel"]), int(e["k"]), None if line is None else float(line),
                       float(e.get("ridge", float("nan"))))].append(float(e["val_acc"]))
    return out


def sensitivity_curves(data: dict[tuple, dict[tuple, list[float]]]) -> dict[tuple, dict[str, dict[Any, list[tuple[int, float]]]]]:
    """{row keys: {kernel: {line value: [(k, accuracy), ...] by k}}}: each point the mean over records
    (seeds) of a setting's validation accuracy, then the best over ridge."""
    out: dict = {}
    for rk, cells in data.items():
        best: dict[tuple, float] = {}
        for (kern, k, line, _ridge), vals in cells.items():
            m = statistics.fmean(vals)
            best[(kern, line, k)] = max(best.get((kern, line, k), -math.inf), m)
        per: dict = defaultdict(lambda: defaultdict(list))
        for (kern, line, k), acc in sorted(best.items(), key=lambda kv: kv[0][2]):
            per[kern][line].append((k, acc))
        out[rk] = {kern: dict(lines) for kern, lines in per.items()}
    return out


def _sensitivity_layout(records: list[dict]):
    """(data, feature sets drawn, all feature sets, kernels, line values, ridges, ks, seeds)."""
    data = sensitivity_data(records)
    rows = list(data)
    shown = rows
    if len(rows) > SENSITIVITY_MAX_ROWS:
        step = (len(rows) - 1) / (SENSITIVITY_MAX_ROWS - 1)
        shown = [rows[round(i * step)] for i in range(SENSITIVITY_MAX_ROWS)]
    cells = [c for r in shown for c in data[r]]
    kernels = sorted({c[0] for c in cells})
    lines = sorted({c[2] for c in cells}, key=lambda v: (v is None, v or 0.0))
    ridges = sorted({c[3] for c in cells})
    ks = sorted({c[1] for c in cells})
    seeds = len({r.get("seed") for r in records})
    return data, shown, rows, kernels, lines, ridges, ks, seeds


def sensitivity_caption(records: list[dict]) -> str:
    """The Markdown sentence under the sensitivity figure of ``records``."""
    _, shown, rows, _, _, ridges, _, n = _sensitivity_layout(records)
    ridge_txt = ", ".join(f"{r:g}" for r in ridges)
    caption = (f"SK's validation accuracy over its whole selection grid: one panel per kernel, k on the x axis, "
               f"one line per lengthscale multiple, each point the mean over {n} seed{'s' if n != 1 else ''} "
               f"of the best ridge in {{{ridge_txt}}}; ★ marks the best setting.")
    if len(shown) < len(rows):
        caption += f" {len(shown)} of the {len(rows)} feature sets drawn (evenly spaced)."
    return caption


def draw_sensitivity(records: list[dict], path: Path) -> None:
    """Draw SK's validation accuracy over its selection grid.

    One row of panels per feature set (a table row carrying ``sk_grid``), one panel per kernel; x: k
    (log scale), one line per lengthscale multiple; y: validation accuracy, mean over the records (seeds)
    of each setting, then the best over ridge. A star marks the best setting of each feature set.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, shown, _, kernels, lines, ridges, ks, n = _sensitivity_layout(records)
    curves = sensitivity_curves(data)
    varying = [k for k, _ in shown[0] if len({dict(rk).get(k) for rk in shown}) > 1] or [k for k, _ in shown[0]]
    cmap = plt.get_cmap("viridis")
    colours = {v: cmap(i / max(1, len(lines) - 1) * 0.9) for i, v in enumerate(lines)}
    fig, axes = plt.subplots(len(shown), len(kernels), figsize=(3.2 * len(kernels) + 1.4, 2.3 * len(shown) + 0.8),
                             squeeze=False, sharex=True, sharey="row")
    for i, rk in enumerate(shown):
        best_kernel, best_k, best_acc = max(((kern, k, acc) for kern, per_line in curves[rk].items()
                                             for pts in per_line.values() for k, acc in pts), key=lambda t: t[2])
        for j, kern in enumerate(kernels):
            ax = axes[i, j]
            for line in lines:
                pts = curves[rk].get(kern, {}).get(line)
                if pts:
                    ax.plot([k for k, _ in pts], [100 * a for _, a in pts], marker="o", ms=3, color=colours[line],
                            label="–" if line is None else f"{line:g}")
            if best_kernel == kern:
                ax.plot([best_k], [100 * best_acc], marker="*", ms=12, color="black", ls="none")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"kernel {kern}", fontsize=9)
            if i == len(shown) - 1:
                ax.set_xlabel("k (neighbours)")
            if j == 0:
                ax.set_ylabel("val acc (%)", fontsize=8)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    handles = [legend[label] for label in sorted(legend, key=lambda s: (s == "–", float(s) if s != "–" else 0.0))]
    multiples = any("lengthscale_mult" in e for rec in records for row in rec.get("rows", []) for e in row.get("sk_grid") or [])
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], title="lengthscale\n× auto" if multiples else "lengthscale",
                   loc="center right", fontsize=8, title_fontsize=8)
    ridge_txt = ", ".join(f"{r:g}" for r in ridges)
    title = (f"SK validation accuracy over its selection grid (mean over {n} seed{'s' if n != 1 else ''}, "
             f"best over ridge in {{{ridge_txt}}}; star: best setting)")
    fig.suptitle(textwrap.fill(title, width=int(14 * fig.get_figwidth())), fontsize=9)  # a narrow figure wraps it
    fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 0.97))
    if len(shown) > 1:
        # Each feature set names its row in a line above it (a rotated y label that long overlaps the
        # next row): room between the rows, then the text at the row's top-left corner.
        fig.subplots_adjust(hspace=0.55)
        for i, rk in enumerate(shown):
            box = axes[i, 0].get_position()
            label = ", ".join(f"{k}={v}" if k != "setting" else str(v) for k, v in rk if k in varying)
            fig.text(box.x0, box.y1 + (0.004 if i else 0.05), label, ha="left", va="bottom", fontsize=8,
                     fontweight="bold")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- build
def build(name: str, runs_dir: Path, out_dir: Path, allow_uncommitted: bool = False) -> list[Path] | None:
    records = load_records(runs_dir, name)
    for r in records:  # recomputed, so that records from other clones or machines compare by settings
        if r.get("config"):
            r["config_id"] = config_id(r["config"])
    if not records:
        print(f"{name}: no records under {runs_dir / name}, nothing to build")
        return None
    parts = sections(records)
    used = [r for s in parts for r in s.records]
    bad = uncommitted(used)
    if bad and not allow_uncommitted:
        listing = "\n".join(f"  {p}: {why}" for p, why in bad)
        raise UncommittedRecordsError(
            f"{name}: {len(bad)} of the {len(used)} run records behind this table were not written by committed "
            f"code, so nobody could rerun what they measured:\n{listing}\n"
            f"Commit the code, rerun them (make table-{name.replace('_', '-')}), then rebuild; or preview with\n"
            f"  python scripts/make_tables.py {name} --allow-uncommitted   (a marked table; never commit it)")
    module = _experiment_module(name)
    has = lambda attr: module is not None and hasattr(module, attr)  # noqa: E731
    md = [f"# {name}", ""]
    if bad:
        md += [f"> **{PREVIEW_BANNER}.** Built with `--allow-uncommitted`; never commit this table. "
               f"{len(bad)} record(s) come from code that cannot be checked out:"]
        md += [f"> - `{p}`: {why}" for p, why in bad] + [""]
    md += [f"Rebuilt from run records by `python scripts/make_tables.py {name}` "
           f"(the runs: `make table-{name.replace('_', '-')}`). Metrics are mean ± std over seeds; n is the number "
           f"of seeds; `select_s` and `settings_tried` are the seconds and the number of settings each method "
           f"spent choosing its hyperparameters on validation.", ""]
    if has("make_figure"):
        md += [f"![{name}]({name}.png)", ""]
    extra_figs = list(module.extra_figures(used)) if has("extra_figures") else []
    for file_name, _ in extra_figs:
        if "/" in file_name or not file_name.startswith(f"{name}_") or not file_name.endswith(".png"):
            raise ValueError(f"experiments.{name}.extra_figures: {file_name!r} must be a file name "
                             f"'{name}_*.png' (it is written beside the table)")
        md += [f"![{file_name[:-4]}]({file_name})", ""]
    tex_parts = [f"% {PREVIEW_BANNER}: built with --allow-uncommitted; never commit this file"] if bad else []
    csv_buf = io.StringIO()
    if bad:
        csv_buf.write(f"# {PREVIEW_BANNER}: built with --allow-uncommitted; never commit this file\n")
    writer = csv.writer(csv_buf)
    csv_header_written = False
    figures: list[tuple[Path, Callable[[Path], Any]]] = []
    grid_sections = [i for i, s in enumerate(parts) if sensitivity_data(s.records)]
    for index, sec in enumerate(parts):
        recs = sec.records
        key_cols, metrics, infos, rows = aggregate(recs)
        header = key_cols + [header_name(m) for m in metrics] + ["n"] + infos
        body = [[_show(r["keys"][k]) for k in key_cols] + [fmt_stat(m, r["stats"].get(m)) for m in metrics]
                + [r["n"]] + [r["info"].get(i, "") for i in infos] for r in rows]
        md += [f"## {sec.title}", ""] + provenance(recs, sec.ignored) + ["", markdown_table(header, body), ""]
        caption = f"{name} ({sec.title.replace('`', '')}): mean ± std over seeds"
        tex_parts.append(latex_table(header, body, ("PREVIEW, not from committed code: " if bad else "") + caption))
        if not csv_header_written:
            writer.writerow(["profile", "setting"] + key_cols + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
                            + ["n_seeds"] + infos)
            csv_header_written = True
        setting = ", ".join(f"{k}={v}" for k, v in sec.setting.items())
        for r in rows:
            vals = []
            for m in metrics:
                st = r["stats"].get(m)
                vals += [f"{st[0]:.6g}", f"{st[1]:.6g}", st[2]] if st else ["", "", 0]
            writer.writerow([sec.profile, setting] + [r["keys"][k] for k in key_cols] + vals + [r["n"]]
                            + [r["info"].get(i, "") for i in infos])
        if has("comparisons"):
            lines = module.comparisons(recs)
            if lines:
                if not all(isinstance(line, str) for line in lines):
                    raise TypeError(f"experiments.{name}.comparisons must return a list of str")
                md += ["### Comparisons", ""] + list(lines) + [""]
        if has("summarize"):
            extra = module.summarize(recs)
            if extra:
                cols = list(extra[0].keys())
                md += [f"### Confidence intervals ({sec.profile})", "",
                       markdown_table(cols, [[_show(e.get(c, "")) for c in cols] for e in extra]), ""]
                tex_parts.append(latex_table(cols, [[_show(e.get(c, "")) for c in cols] for e in extra],
                                             f"{name} ({sec.profile} profile): 95% bootstrap confidence intervals"))
        if index in grid_sections:
            fig = out_dir / (f"{name}_sensitivity.png" if len(grid_sections) == 1 else f"{name}_sensitivity_{sec.slug}.png")
            figures.append((fig, lambda p, recs=recs: draw_sensitivity(recs, p)))
            md += ["### Sensitivity of SK to its hyperparameters", "", f"![SK sensitivity]({fig.name})", "",
                   sensitivity_caption(recs), ""]
    files = {out_dir / f"{name}.md": "\n".join(md).rstrip() + "\n",
             out_dir / f"{name}.csv": csv_buf.getvalue(),
             out_dir / f"{name}.tex": "\n\n".join(tex_parts) + "\n"}
    if has("make_figure"):
        figures.insert(0, (out_dir / f"{name}.png", lambda p: module.make_figure(used, p)))
    figures += [(out_dir / file_name, draw) for file_name, draw in extra_figs]
    written = _write_all(files, figures)
    keep = {p.name for p in written}
    for stale in out_dir.glob(f"{name}_sensitivity*.png"):  # a figure of a section that no longer exists
        if stale.name not in keep:
            stale.unlink()
    return written


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _experiment_module(name: str):
    try:
        return importlib.import_module(f"experiments.{name}")
    except ImportError as e:
        print(f"{name}: no module experiments.{name} ({e}); building the table without a figure")
        return None


def _write_all(files: dict[Path, str], figures: list[tuple[Path, Callable[[Path], Any]]]) -> list[Path]:
    """Draw every figure and write every file to a temporary name, then rename them all: whole tables or
    nothing."""
    with contextlib.ExitStack() as stack:  # each atomic_write renames on exit, or deletes if anything failed
        for path, draw in figures:
            draw(stack.enter_context(atomic_write(path, suffix=".png")))
        for path, text in files.items():
            stack.enter_context(atomic_write(path)).write_text(text)
    return [path for path, _ in figures] + list(files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="*", help="experiment names (default: every one with records)")
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "runs")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output folder (default: results/, or {_rel(str(PREVIEW_OUT))}/ with --allow-uncommitted)")
    ap.add_argument("--allow-uncommitted", action="store_true",
                    help="build from records of uncommitted or unknown code too, marked PREVIEW (never commit it)")
    args = ap.parse_args(argv)
    out = args.out or (PREVIEW_OUT if args.allow_uncommitted else ROOT / "results")
    names = args.tables or sorted(p.name for p in args.runs.glob("*") if p.is_dir())
    if not names:
        print(f"no records under {args.runs}: run an experiment first (see README)")
        return 0
    built, failed = 0, 0
    for name in names:
        try:
            written = build(name, args.runs, out, allow_uncommitted=args.allow_uncommitted)
        except UncommittedRecordsError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if written:
            built += 1
            print(f"{name}: wrote " + ", ".join(str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in written))
        elif args.tables:
            failed += 1
    if failed:
        return 1
    return 0 if built or not args.tables else 1


if __name__ == "__main__":
    sys.exit(main())
