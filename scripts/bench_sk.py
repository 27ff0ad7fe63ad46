#!/usr/bin/env python
"""Benchmark of the sk library on this machine; writes a Markdown report (results/bench_sk.md).

    .venv/bin/python scripts/bench_sk.py --out results/bench_sk.md        # full, ~10-15 min on 2 cores
    .venv/bin/python scripts/bench_sk.py --quick --out /tmp/bench.md      # tiny smoke version
    .venv/bin/python scripts/bench_sk.py --sections 7 --out /tmp/small.md # one section

Sections, all measured in this process (the memory case in a fresh subprocess), one module each under
``scripts/bench/``:
1. SK versus a plain chunked k-NN vote with the same search (M=4000, N=20000, d=256, k=32, float32).
2. The neighbour search's FLOP rate against the machine's measured matmul rate.
3. SK against exact KRR (torch Cholesky) and scikit-learn's KernelRidge at N = 5k, 10k, 20k: time,
   test error, log-log scaling exponents.
4. Peak memory of SK at M=50k, N=100k, d=64, k=16 (VmHWM of a subprocess minus its RSS with inputs).
5. Classes and training: SK with integer labels at C=10 and C=1000 on the same data (the label path),
   and one training step (forward + backward to the evaluation points, fixed support 50k x 256, batch
   1024, k=32) against the neighbour search alone.
6. Fashion-MNIST raw pixels (found as the experiments find it: $SK_DATA, torchvision's layout, Debian's
   folder): training-free SK (k, lengthscale, ridge, kernel picked on a validation split) against DINO's
   weighted k-NN and exact KRR on a subset.
7. Small calls, one thread (an RL agent's SK head: 256 support points, d=256, k=16): the time of one
   call with 1 and 64 queries, and of forward + backward to 64 queries, on a plain tensor and on an
   ``sk.PrecomputedSupport`` (with and without its N x N distances); each against a minimal local KRR
   written in the benchmark (and checked against SK at that shape) and against DINO's weighted k-NN vote.

When CUDA is present, a GPU section is measured too and written to ``--cuda-out``
(results/bench_sk_cuda.md) with the card's name (``scripts/bench/device.py``). ``--cuda-only`` runs that
section alone. ``--device-section-on-cpu`` runs the same code on the CPU at tiny sizes (a check of the
code path, not GPU numbers; used by the tests).

Every report names its commit, its command, the machine and the load average at start and end, and says
at its top when the load says other work shared the cores (``experiments.core.records.LOAD_MARGIN``).
Every number in the report is measured by this script; the reports are written atomically at the end.
Ratios compare runs made in the same process, interleaved.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from experiments.core.atomic import atomic_write  # noqa: E402
from scripts.bench import classes, device, fashion, memory, ratio, scaling, small  # noqa: E402
from scripts.bench.provenance import Provenance, command_line  # noqa: E402
from scripts.bench.sizes import DEVICE_FULL, DEVICE_QUICK, FULL, QUICK  # noqa: E402
from scripts.bench.timing import log  # noqa: E402


class Section(NamedTuple):
    key: str                                       # its name for --sections
    title: str                                     # for the log
    run: Callable[[dict, int], list[str]]          # (sizes, torch threads) -> Markdown lines


SECTIONS = [
    Section("1-2", "SK versus the k-NN vote, search FLOP rate", ratio.section),
    Section("3", "scaling against exact KRR and scikit-learn", scaling.section),
    Section("4", "peak memory (subprocess)", memory.section),
    Section("5", "classes and a training step", classes.section),
    Section("6", "Fashion-MNIST", fashion.section),
    Section("7", "small calls", small.section),
]


def chosen_sections(spec: str | None) -> list[Section]:
    """The sections a comma-separated list of keys names (all when None), in the report's order."""
    if spec is None:
        return SECTIONS
    keys = {key.strip() for key in spec.split(",")}
    unknown = keys - {s.key for s in SECTIONS}
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}: known are {[s.key for s in SECTIONS]}")
    return [s for s in SECTIONS if s.key in keys]


def cpu_report(sections: list[Section], sizes: dict, prov: Provenance, quick: bool) -> str:
    """Run the sections in order and join their Markdown under the report's header."""
    body = []
    for s in sections:
        log(f"{s.key}. {s.title}")
        body += s.run(sizes, prov.threads)
    scope = "All runs on the CPU, float32 unless said otherwise."
    if len(sections) < len(SECTIONS):
        scope += f" Sections run: {', '.join(s.key for s in sections)} (of {', '.join(s.key for s in SECTIONS)})."
    return "\n".join(prov.header("sk benchmark", quick, prov.machine_line(), scope) + body)


def write_report(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench_sk.md", help="Markdown report to write")
    parser.add_argument("--cuda-out", help="GPU report (default: the --out name with _cuda before .md)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the script")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--sections", help="comma-separated CPU sections to run (default all): "
                        + ", ".join(s.key for s in SECTIONS))
    parser.add_argument("--cuda-only", action="store_true", help="only the GPU section")
    parser.add_argument("--device-section-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        args.sections = chosen_sections(args.sections)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    out_path = Path(args.out)
    cuda_out = Path(args.cuda_out) if args.cuda_out else out_path.with_name(out_path.stem + "_cuda.md")
    if not args.cuda_only:
        prov = Provenance(command, args.threads)
        log(f"machine: {prov.machine_line()}; commit {prov.commit}")
        write_report(out_path, cpu_report(args.sections, QUICK if args.quick else FULL, prov, args.quick))
        log(f"wrote {out_path}")
    if torch.cuda.is_available() or args.device_section_on_cpu:
        dev = torch.device("cuda" if torch.cuda.is_available() and not args.device_section_on_cpu else "cpu")
        prov = Provenance(command, args.threads)
        log(f"GPU section on {dev}")
        res = device.measure(DEVICE_QUICK if args.quick or dev.type == "cpu" else DEVICE_FULL, dev)
        write_report(cuda_out, device.report(prov, dev, res, args.quick))
        log(f"wrote {cuda_out}")
    elif args.cuda_only:
        raise SystemExit("--cuda-only: no CUDA device here")


if __name__ == "__main__":
    main()
