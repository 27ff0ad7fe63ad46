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

Per section the experiment's report module (experiments/reports/<name>.py) may add (see docs/INTERFACES.md, "Reports"):
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
import io
import math
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.core.atomic import atomic_write  # noqa: E402
from experiments.core.records import (LOAD_MARGIN, config_id, describe_machine, load_contaminated,  # noqa: E402
                                     load_records, uncommitted_reason)
from experiments.core.tables import with_derived_keys  # noqa: E402
from experiments.reports import load as load_report  # noqa: E402
from experiments.reports.sensitivity import draw_sensitivity, sensitivity_caption, sensitivity_data  # noqa: E402

PREVIEW_BANNER = "PREVIEW — not from committed code"
PREVIEW_OUT = ROOT / "outputs" / "tables-preview"
# Selection cost of a method, shown right after the accuracy columns: seconds spent choosing its
# hyperparameters on validation, and the number of settings it tried there (1 for a fixed setting).
COST_METRICS = ("select_s", "settings_tried")
# What tells two settings of one profile apart (config paths); a section per distinct combination.
SETTING_FIELDS = {"data": ("data", "name"), "backbone": ("backbone", "name"), "model": ("backbone", "model"),
                  "img_size": ("backbone", "img_size")}


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


def sections(records: list[dict], used_config: Callable[[dict], dict] | None = None) -> list[Section]:
    """Group records by profile, then by setting (only where a profile holds several); in each group add
    to every row the keys derived from the configuration (``experiments.core.tables``: every knob that
    differs between records with the same row keys), and keep the newest configuration of every table row
    (``select_latest``)."""
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
            chosen, ignored = select_latest(with_derived_keys(groups[key], used_config))
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
    lines += load_lines(recs)
    if ignored:
        lines.append(f"- {ignored} older record(s) left out: superseded by a newer configuration of the same rows, or by a rerun of the same seed")
    return lines


def load_lines(recs: list[dict]) -> list[str]:
    """The machine's load while the runs timed themselves (records from before the load was recorded: none)."""
    loads = [r["load"] for r in recs if r.get("load")]
    if not loads:
        return []
    readings = [x for ld in loads for x in (ld.get("start"), ld.get("end")) if x]
    dirty = [ld for ld in loads if load_contaminated([ld.get("start"), ld.get("end")], int(ld["own_threads"]))]
    unknown = [ld for ld in loads if load_contaminated([ld.get("start"), ld.get("end")], 1) is None]
    peak = max((x[0] for x in readings), default=float("nan"))
    verdict = ("clean: no run started or ended with a 1-minute load average above its sweep's own threads + "
               f"{LOAD_MARGIN:g}" if not dirty else
               f"**contaminated**: {len(dirty)} of {len(loads)} runs started or ended with a 1-minute load average "
               f"above their sweep's own threads + {LOAD_MARGIN:g} (other work on the machine): their seconds are not "
               "comparable")
    return [f"- Load (1-minute average) at the runs' start and end: at most {peak:.2f}; timings {verdict}"
            + (f"; {len(unknown)} run(s) without a reading" if unknown else "")]


def _short_commit(commit: str) -> str:
    """First 12 hex digits, keeping the mark of uncommitted changes."""
    return commit[:12] + (" (with uncommitted changes)" if commit.endswith("-dirty") else "")


def _strip_seed(command: str) -> str:
    return " ".join(p for p in command.split() if not p.startswith("seed="))


# ----------------------------------------------------------------------------------------------- build
def build(name: str, runs_dir: Path, out_dir: Path, allow_uncommitted: bool = False) -> list[Path] | None:
    records = load_records(runs_dir, name)
    for r in records:  # recomputed, so that records from other clones or machines compare by settings
        if r.get("config"):
            r["config_id"] = config_id(r["config"])
    if not records:
        print(f"{name}: no records under {runs_dir / name}, nothing to build")
        return None
    module = load_report(name)
    parts = sections(records, getattr(module, "used_config", None))
    used = [r for s in parts for r in s.records]
    bad = committed_or_preview(name, used, allow_uncommitted)
    has = lambda attr: module is not None and hasattr(module, attr)  # noqa: E731
    md = _header(name, bad, has("make_figure"))
    extra_figs = list(module.extra_figures(used)) if has("extra_figures") else []
    for file_name, _ in extra_figs:
        if "/" in file_name or not file_name.startswith(f"{name}_") or not file_name.endswith(".png"):
            raise ValueError(f"experiments.reports.{name}.extra_figures: {file_name!r} must be a file name "
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
        _csv_rows(writer, sec, key_cols, metrics, infos, rows, header=not csv_header_written)
        csv_header_written = True
        if has("comparisons"):
            lines = module.comparisons(recs)
            if lines:
                if not all(isinstance(line, str) for line in lines):
                    raise TypeError(f"experiments.reports.{name}.comparisons must return a list of str")
                md += ["### Comparisons", ""] + list(lines) + [""]
        if has("summarize"):
            extra = module.summarize(recs)
            if extra:
                cols = list(extra[0].keys())
                md += [f"### Confidence intervals ({sec.profile})", "",
                       markdown_table(cols, [[_show(e.get(c, "")) for c in cols] for e in extra]), ""]
                tex_parts.append(latex_table(cols, [[_show(e.get(c, "")) for c in cols] for e in extra],
                                             f"{name} ({sec.profile} profile): 95% confidence intervals"))
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


def committed_or_preview(name: str, used: list[dict], allow_uncommitted: bool) -> list[tuple[str, str]]:
    """The records behind a table that no commit can reproduce; raise unless a preview is asked for."""
    bad = uncommitted(used)
    if bad and not allow_uncommitted:
        listing = "\n".join(f"  {p}: {why}" for p, why in bad)
        raise UncommittedRecordsError(
            f"{name}: {len(bad)} of the {len(used)} run records behind this table were not written by committed "
            f"code, so nobody could rerun what they measured:\n{listing}\n"
            f"Commit the code, rerun them (make table-{name.replace('_', '-')}), then rebuild; or preview with\n"
            f"  python scripts/make_tables.py {name} --allow-uncommitted   (a marked table; never commit it)")
    return bad


def _header(name: str, bad: list[tuple[str, str]], figure: bool) -> list[str]:
    md = [f"# {name}", ""]
    if bad:
        md += [f"> **{PREVIEW_BANNER}.** Built with `--allow-uncommitted`; never commit this table. "
               f"{len(bad)} record(s) come from code that cannot be checked out:"]
        md += [f"> - `{p}`: {why}" for p, why in bad] + [""]
    md += [f"Rebuilt from run records by `python scripts/make_tables.py {name}` "
           f"(the runs: `make table-{name.replace('_', '-')}`). Metrics are mean ± std over seeds; n is the number "
           f"of seeds; `select_s` and `settings_tried` are the seconds and the number of settings each method "
           f"spent choosing its hyperparameters on validation.", ""]
    return md + ([f"![{name}]({name}.png)", ""] if figure else [])


def _csv_rows(writer, sec: Section, key_cols, metrics, infos, rows, header: bool) -> None:
    """A section's rows in the CSV (its header first, for the first section)."""
    if header:
        writer.writerow(["profile", "setting"] + key_cols + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
                        + ["n_seeds"] + infos)
    setting = ", ".join(f"{k}={v}" for k, v in sec.setting.items())
    for r in rows:
        vals = []
        for m in metrics:
            st = r["stats"].get(m)
            vals += [f"{st[0]:.6g}", f"{st[1]:.6g}", st[2]] if st else ["", "", 0]
        writer.writerow([sec.profile, setting] + [r["keys"][k] for k in key_cols] + vals + [r["n"]]
                        + [r["info"].get(i, "") for i in infos])


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
