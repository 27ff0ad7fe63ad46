"""Memory budgets of SK's chunked loops, sized from the device.

Two loops hold one block at a time, and their block sizes decide both the peak memory and the speed:

- the neighbour search: a (rows, N) block of scores per chunk of evaluation points
  (``search_rows``);
- the local solves: per chunk of B evaluation points, the gathered neighbours (B, k, d), their k x k
  systems and the chunk's outputs (``local_rows``).

The budget is in bytes and depends on the device:

- **CPU**: fixed sizes measured on this project's 2-core machine (``results/bench_sk.md``): 64 MiB
  score blocks (larger ones were not faster: the matmul already runs near its rate at a few hundred
  rows) and 16 MiB local blocks (blocks under glibc's 32 MiB mmap threshold are recycled by malloc;
  larger ones are mapped afresh for every chunk and their page faults cost more than the arithmetic).
- **CUDA**: a fraction of the memory that is free for this process (``torch.cuda.mem_get_info`` plus
  what torch's caching allocator holds unused), capped: ``min(free / 4, 768 MiB)`` for the search
  and ``min(free / 4, 512 MiB)`` for the local solves, never below the CPU sizes. A GPU wants large
  blocks (small ones leave it idle between kernel launches: 64 MiB score blocks made the search
  1.7-2.9x slower and 16 MiB local blocks made the local solves 5-6x slower on an H200 than large
  blocks); the caps keep SK's working memory at the ImageNet k-NN shape (10k queries, 1.28M support
  points, d = 384) under 1 GiB beyond the support itself. The two loops run one after the other, so
  their blocks are never held together.

Override: ``sk.set_block_budget(search_bytes=..., local_bytes=...)`` for the process, or
``with sk.block_budget(search_bytes=..., local_bytes=...):`` for a block of code; the environment
variables ``SK_SEARCH_BLOCK_BYTES`` and ``SK_LOCAL_BLOCK_BYTES`` set the same at import. An override
applies on every device. ``chunk_size`` arguments (rows per chunk) take precedence over any budget.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

__all__ = ["search_block_bytes", "local_block_bytes", "search_rows", "local_rows", "block_budget",
           "set_block_budget", "CPU_SEARCH_BYTES", "CPU_LOCAL_BYTES"]

MiB = 1 << 20
CPU_SEARCH_BYTES = 64 * MiB
CPU_LOCAL_BYTES = 16 * MiB
CUDA_SEARCH_CAP = 768 * MiB
CUDA_LOCAL_CAP = 512 * MiB
CUDA_FREE_FRACTION = 0.25


def _env_bytes(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    return n


_override: dict[str, int | None] = {"search": _env_bytes("SK_SEARCH_BLOCK_BYTES"),
                                    "local": _env_bytes("SK_LOCAL_BLOCK_BYTES")}


def _check_bytes(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (bytes) or None, got {value!r}")
    return value


def set_block_budget(search_bytes: int | None = None, local_bytes: int | None = None) -> dict:
    """Set the block budgets (bytes) of the search and of the local solves for every device; None
    restores the device default. Returns the previous settings (a dict for ``set_block_budget(**old)``)."""
    previous = dict(search_bytes=_override["search"], local_bytes=_override["local"])
    _override["search"] = _check_bytes("search_bytes", search_bytes)
    _override["local"] = _check_bytes("local_bytes", local_bytes)
    return previous


@contextmanager
def block_budget(search_bytes: int | None = None, local_bytes: int | None = None):
    """``with sk.block_budget(search_bytes=2**30):`` sets budgets for the enclosed code (see module doc)."""
    previous = set_block_budget(search_bytes, local_bytes)
    try:
        yield
    finally:
        set_block_budget(**previous)


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes this process can still use on a CUDA device: the driver's free memory plus the blocks that
    torch's caching allocator has reserved but not handed out."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _budget(kind: str, device: torch.device, free_bytes: int | None) -> int:
    override = _override[kind]
    if override is not None:
        return override
    cpu = CPU_SEARCH_BYTES if kind == "search" else CPU_LOCAL_BYTES
    if device.type != "cuda" and free_bytes is None:
        return cpu
    if free_bytes is None:
        free_bytes = cuda_free_bytes(device)
    cap = CUDA_SEARCH_CAP if kind == "search" else CUDA_LOCAL_CAP
    return max(cpu, min(int(CUDA_FREE_FRACTION * free_bytes), cap))


def search_block_bytes(device: torch.device | str, free_bytes: int | None = None) -> int:
    """Bytes of the search's score block on ``device``. ``free_bytes`` stands in for the device's free
    memory (as on CUDA) whatever the device: for tests and planning."""
    return _budget("search", torch.device(device), free_bytes)


def local_block_bytes(device: torch.device | str, free_bytes: int | None = None) -> int:
    """Bytes of one chunk of local solves on ``device`` (see ``search_block_bytes`` for ``free_bytes``)."""
    return _budget("local", torch.device(device), free_bytes)


def _rows(kind: str, total_rows: int, row_bytes: int, device: torch.device, free_bytes: int | None) -> int:
    total_rows = max(int(total_rows), 1)
    row_bytes = max(int(row_bytes), 1)
    cpu = CPU_SEARCH_BYTES if kind == "search" else CPU_LOCAL_BYTES
    # A problem that fits the smallest budget whole needs no device query (cheap for tiny calls).
    if _override[kind] is None and free_bytes is None and total_rows * row_bytes <= cpu:
        return total_rows
    return max(1, min(total_rows, _budget(kind, device, free_bytes) // row_bytes))


def search_rows(m: int, n: int, element_size: int, device: torch.device, free_bytes: int | None = None) -> int:
    """Evaluation points per chunk of the search: a (rows, n) score block within the budget (>= 1)."""
    return _rows("search", m, n * element_size, device, free_bytes)


def local_rows(m: int, row_bytes: int, device: torch.device, free_bytes: int | None = None) -> int:
    """Evaluation points per chunk of the local solves, ``row_bytes`` being one point's working set."""
    return _rows("local", m, row_bytes, device, free_bytes)
