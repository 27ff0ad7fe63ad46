"""What a benchmark report says about its run: the commit, the exact command, the machine, the software,
the load average at start and at end, and whether other work contaminated the timings.

The rule (``experiments.core.records.LOAD_MARGIN``): a run is contaminated when the 1-minute load
average at its start or at its end exceeds the torch threads the benchmark uses plus the margin; the
report then says so at its top.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments.core.records import (LOAD_MARGIN, describe_machine, git_commit, load_average, load_contaminated,
                                      machine_info)

ROOT = Path(__file__).resolve().parents[2]


def command_line(script: str | Path, argv: list[str]) -> str:
    """The command as typed from the repository root: the interpreter, the script and its arguments."""
    python = "python" if sys.executable.startswith("/usr") else os.path.relpath(sys.executable)
    return shlex.join([python, os.path.relpath(script), *argv])


def software() -> str:
    versions = {}
    for name in ("sklearn", "faiss"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, scikit-learn "
            f"{versions['sklearn']}, faiss {versions['faiss']}, {platform.platform()}")


def load_verdict(start: tuple | None, end: tuple | None, threads: int) -> str:
    """The report's first word on its timings: clean, contaminated (bold) or unknown, with the rule."""
    verdict = load_contaminated([start, end], threads)
    if verdict is None:
        return "Load average not available on this system: whether other work shared the cores is unknown."
    limit = threads + LOAD_MARGIN
    said = (f"the 1-minute load average was {start[0]:.2f} at start and {end[0]:.2f} at end; the limit is {limit:g} "
            f"(the {threads} torch thread(s) the benchmark uses + {LOAD_MARGIN})")
    if verdict:
        return f"**Contaminated timings: {said}. Other work shared the cores: rerun on a quiet machine.**"
    return f"Clean timings: {said}."


def fmt_load(load: tuple | None) -> str:
    return "n/a" if load is None else ", ".join(f"{v:.2f}" for v in load)


@dataclass
class Provenance:
    """Taken when a report's measurements start (after torch's thread count is set); ``header`` at
    their end reads the load average again and writes the report's top lines."""

    command: str
    threads: int
    commit: str = field(default_factory=lambda: git_commit(ROOT))
    machine: dict = field(default_factory=machine_info)
    load_start: tuple | None = field(default_factory=load_average)
    started: float = field(default_factory=time.perf_counter)

    def machine_line(self) -> str:
        return f"Machine: {describe_machine(self.machine)}, CUDA available: {torch.cuda.is_available()}"

    def header(self, title: str, quick: bool, machine_line: str, scope: str) -> list[str]:
        """The top of a report: title, quick-run and load warnings, provenance, ``scope`` (what was run)."""
        load_end = load_average()
        total = time.perf_counter() - self.started
        out = [f"# {title}", ""]
        if quick:
            out += ["**Quick smoke run (tiny sizes): not the benchmark's numbers.**", ""]
        return out + [
            load_verdict(self.load_start, load_end, self.threads),
            "",
            f"Commit: `{self.commit}`  ",
            f"Command: `{self.command}`  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
            f"{machine_line}  ",
            f"Software: {software()}  ",
            f"Load average (1, 5, 15 min) at start: {fmt_load(self.load_start)}; at end: {fmt_load(load_end)}  ",
            f"Total time: {total / 60:.1f} min. {scope}",
            "",
        ]
