"""Build results/<table>.{md,csv,tex} (and the experiment's figure) from run records.

    python scripts/make_tables.py                 # every experiment that has records
    python scripts/make_tables.py cnn_readout     # one table

Records are read from results/runs/<experiment>/<profile>/*.json. Within a profile only the records
of the most recent configuration (the newest ``config_id``) are aggregated, so that runs of different
settings are never averaged together; older ones are counted in the header. Each row's metrics become
``mean ± std`` over seeds with their number ``n``. All files of a table are written to temporary files
first and renamed at the end: a table is written whole or not at all.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import math
import os
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.core.records import config_id, describe_machine, load_records  # noqa: E402


def select_latest(records: list[dict]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """profile -> records to aggregate; profile -> number of superseded records left out.

    A configuration (``config_id``) is superseded when a newer configuration of the same profile
    produces any of the same table rows: its numbers are out of date. Configurations whose rows differ
    (for example the two agents of a comparison, run as separate jobs) are kept side by side.
    """
    by_profile: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_profile[r.get("profile", "default")].append(r)
    chosen, ignored = {}, {}
    for profile, recs in by_profile.items():
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
        # a rerun of the same configuration and seed replaces the older record
        latest: dict[tuple, dict] = {}
        for r in recs:
            key = (r["config_id"], r.get("seed"))
            if r["config_id"] in kept and (key not in latest or r.get("started_utc", "") > latest[key].get("started_utc", "")):
                latest[key] = r
        chosen[profile] = sorted(latest.values(), key=lambda r: (r.get("started_utc", ""), r.get("_path", "")))
        ignored[profile] = len(recs) - len(chosen[profile])
    order = ["quick", "paper"]
    chosen = dict(sorted(chosen.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])))
    return chosen, ignored


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
    return key_cols, metric_names, info_names, out


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
    if abs(mean) >= 1000 or float(mean).is_integer():
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
                 ("±", r"$\pm$"), ("–", "--"), ("→", r"$\to$")]:
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


def provenance(name: str, recs: list[dict], ignored: int) -> list[str]:
    seeds = sorted({r.get("seed") for r in recs})
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


def build(name: str, runs_dir: Path, out_dir: Path) -> list[Path] | None:
    records = load_records(runs_dir, name)
    for r in records:  # recomputed, so that records from other clones or machines compare by settings
        if r.get("config"):
            r["config_id"] = config_id(r["config"])
    if not records:
        print(f"{name}: no records under {runs_dir / name}, nothing to build")
        return None
    chosen, ignored = select_latest(records)
    module = _experiment_module(name)
    md = [f"# {name}", "",
          f"Rebuilt from run records by `python scripts/make_tables.py {name}` "
          f"(the runs: `make table-{name.replace('_', '-')}`). Metrics are mean ± std over seeds; n is the number of seeds.", ""]
    tex_parts, csv_buf = [], io.StringIO()
    writer = csv.writer(csv_buf)
    csv_header_written = False
    used: list[dict] = []
    for profile, recs in chosen.items():
        used += recs
        key_cols, metrics, infos, rows = aggregate(recs)
        header = key_cols + [header_name(m) for m in metrics] + ["n"] + infos
        body = [[_show(r["keys"][k]) for k in key_cols] + [fmt_stat(m, r["stats"].get(m)) for m in metrics]
                + [r["n"]] + [r["info"].get(i, "") for i in infos] for r in rows]
        md += [f"## Profile `{profile}`", ""] + provenance(name, recs, ignored[profile]) + ["", markdown_table(header, body), ""]
        tex_parts.append(latex_table(header, body, f"{name} ({profile} profile): mean ± std over seeds"))
        if not csv_header_written:
            writer.writerow(["profile"] + key_cols + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")] + ["n_seeds"] + infos)
            csv_header_written = True
        for r in rows:
            vals = []
            for m in metrics:
                st = r["stats"].get(m)
                vals += [f"{st[0]:.6g}", f"{st[1]:.6g}", st[2]] if st else ["", "", 0]
            writer.writerow([profile] + [r["keys"][k] for k in key_cols] + vals + [r["n"]] + [r["info"].get(i, "") for i in infos])
        if module is not None and hasattr(module, "summarize"):
            extra = module.summarize(recs)
            if extra:
                cols = list(extra[0].keys())
                md += [f"### Confidence intervals ({profile})", "",
                       markdown_table(cols, [[_show(e.get(c, "")) for c in cols] for e in extra]), ""]
                tex_parts.append(latex_table(cols, [[_show(e.get(c, "")) for c in cols] for e in extra],
                                             f"{name} ({profile} profile): 95% bootstrap confidence intervals"))
    files = {out_dir / f"{name}.md": "\n".join(md).rstrip() + "\n",
             out_dir / f"{name}.csv": csv_buf.getvalue(),
             out_dir / f"{name}.tex": "\n\n".join(tex_parts) + "\n"}
    figure = out_dir / f"{name}.png"
    if module is not None and hasattr(module, "make_figure"):
        md.insert(4, f"![{name}]({name}.png)\n")
        files[out_dir / f"{name}.md"] = "\n".join(md).rstrip() + "\n"
    return _write_all(files, figure if module is not None and hasattr(module, "make_figure") else None,
                      module, used)


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


def _write_all(files: dict[Path, str], figure: Path | None, module, records: list[dict]) -> list[Path]:
    """Write every file to a temporary name, then rename them all: whole tables or nothing."""
    out_dir = next(iter(files)).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            temps.append((tmp, path))
        if figure is not None:
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{figure.name}.", suffix=".png")
            os.close(fd)
            temps.append((tmp, figure))
            module.make_figure(records, Path(tmp))
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    return [p for _, p in temps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="*", help="experiment names (default: every one with records)")
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "runs")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    names = args.tables or sorted(p.name for p in args.runs.glob("*") if p.is_dir())
    if not names:
        print(f"no records under {args.runs}: run an experiment first (see README)")
        return 0
    built = 0
    for name in names:
        written = build(name, args.runs, args.out)
        if written:
            built += 1
            print(f"{name}: wrote " + ", ".join(str(p.relative_to(args.out)) if p.is_relative_to(args.out) else str(p) for p in written))
        elif args.tables:
            return 1
    return 0 if built or not args.tables else 1


if __name__ == "__main__":
    sys.exit(main())
