"""Run records: one JSON file per run under ``results/runs/<experiment>/``, written atomically."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from experiments.core.atomic import atomic_write


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (``experiments.core.atomic.atomic_write``)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def git_commit(root: Path | str = ".") -> str:
    """HEAD's commit, with ``-dirty`` when files outside ``results/`` differ from it: changed tracked files,
    or new files git does not ignore (a new module the run imported). ``results/`` holds what the runs
    wrote: a rebuilt table or a new record does not change the code of the next run."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal", "--", ":/",
                                ":(top,exclude)results"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def uncommitted_reason(commit: str, root: Path | str = ".") -> str | None:
    """Why the code of a record's ``git_commit`` cannot be checked out from ``root``'s history, or None.

    A record is from committed code when its commit is clean (no ``-dirty`` mark), known, and an
    ancestor of (or equal to) ``root``'s HEAD.
    """
    if not commit or commit == "unknown":
        return "unknown commit (written outside a git checkout)"
    if commit.endswith("-dirty"):
        return f"{commit[:12]} with uncommitted changes (-dirty)"
    try:
        out = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{commit[:12]}: git could not be asked ({e})"
    if out.returncode != 0:
        return f"{commit[:12]} is not in this repository's history"
    return None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(m: dict[str, Any]) -> str:
    """One line such as 'CPU AMD EPYC (2 threads)' or 'GPU NVIDIA H100'."""
    if m.get("gpu"):
        return f"GPU {m['gpu']} (host CPU {m.get('cpu')})"
    return f"CPU {m.get('cpu')} ({m.get('torch_threads')} torch threads of {m.get('cpu_count')} cores)"


# Timings taken while other work shared the cores are flagged: a run is contaminated when the 1-minute
# load average at its start or at its end exceeds the threads the run itself uses by more than this.
LOAD_MARGIN = 0.5


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages (``os.getloadavg``), or None where the system keeps none."""
    try:
        return tuple(os.getloadavg())
    except (AttributeError, OSError):
        return None


def load_contaminated(readings: list[tuple[float, float, float] | None], threads: int) -> bool | None:
    """Whether timings taken between these load readings (e.g. at start and at end) are contaminated:
    some 1-minute load average above ``threads + LOAD_MARGIN``. None when a reading is missing."""
    if any(r is None for r in readings):
        return None
    return any(r[0] > threads + LOAD_MARGIN for r in readings)


def config_id(config: dict[str, Any]) -> str:
    """Hash of a run's configuration without what does not change its result: the seed, where the
    repository, data and outputs live (absolute paths differ between clones and machines), logging."""
    ignore = {"seed", "paths", "logger", "hydra", "device", "threads"}
    kept = {k: _without_locations(v) for k, v in config.items() if k not in ignore}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _without_locations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_locations(v) for k, v in node.items() if k not in {"root", "dir", "download"}}
    return node


def load_records(runs_dir: Path, experiment: str) -> list[dict[str, Any]]:
    """All complete records of one experiment; a file that is not valid JSON is reported and skipped."""
    folder = Path(runs_dir) / experiment
    records = []
    for p in sorted(folder.glob("**/*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable record {p}: {e}", file=sys.stderr)
            continue
        rec["_path"] = str(p)
        records.append(rec)
    return records
