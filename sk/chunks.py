"""The chunk runner: SK's local solves, a chunk of evaluation points at a time, with one re-run rule.

``run_chunks(run, m, rows, device, graph)`` calls ``run(start, robust)`` for the chunks of ``rows``
evaluation points that cover ``m`` points and concatenates their outputs. Each call returns the chunk's
outputs and a 0-dim device flag: did one of its factorisations fail (a singular or indefinite local
system). The flags are not looked at inside the loop: after it, one host synchronisation finds the failed
chunks, which are run again with ``robust=True`` (jitter escalation, ``sk.robust_cholesky``); their first
outputs are discarded, graph included. A call whose points fit one chunk skips the loop.

Threads. On a CPU with several torch threads, chunks that record no autograd graph run in parallel, one
per thread (a chunk is thousands of tiny factorisations that no single op parallelises well). Whenever a
graph is recorded, or a ``torch.func`` transform is active, the chunks run one after the other in the
calling thread: autograd's and functorch's state is thread-local (grad mode can be handed to a worker,
but not ``torch.func``'s transform levels, saved-tensor hooks or anomaly mode), so only the calling
thread gives the same values and gradients whatever the thread count.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from .functions import functorch_active

__all__ = ["run_chunks", "chunk_rows", "chunks_in_parallel", "map_chunks"]

ChunkFn = Callable[[int, bool], "tuple[Tensor, Tensor | None]"]


def chunks_in_parallel(device: torch.device, chunks: int, graph: bool) -> bool:
    """Whether ``chunks`` chunks run in worker threads: on a CPU with several torch threads, when no graph
    is recorded and no ``torch.func`` transform is active (see the module doc)."""
    return (device.type == "cpu" and chunks >= 2 and not graph and torch.get_num_threads() > 1
            and not functorch_active())


def chunk_rows(m: int, rows: int, device: torch.device, graph: bool) -> int:
    """Rows per chunk, at most ``rows``; when the chunks run in parallel, such that they split evenly over
    the threads (13 chunks on 2 threads leave one thread idle for the last; 14 do not)."""
    chunks = -(-m // rows)
    if chunks < 2 or not chunks_in_parallel(device, chunks, graph):
        return rows
    threads = torch.get_num_threads()
    chunks = -(-chunks // threads) * threads
    return -(-m // chunks)


def map_chunks(fn, starts, device: torch.device, graph: bool) -> list:
    """``[fn(s) for s in starts]``, in worker threads when ``chunks_in_parallel`` allows: one chunk per
    thread, each op single-threaded (the torch thread count, process state, is 1 meanwhile); grad mode and
    inference mode are handed to the workers."""
    if not chunks_in_parallel(device, len(starts), graph):
        return [fn(s) for s in starts]
    threads = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(start):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(start)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            return list(pool.map(task, starts))
    finally:
        torch.set_num_threads(threads)


def run_chunks(run: ChunkFn, m: int, rows: int, device: torch.device, graph: bool) -> Tensor:
    """``torch.cat([run(s, False)[0] for s in range(0, m, rows)])``, with the chunks whose flag says a
    factorisation failed run again with ``robust=True`` (one host synchronisation for all chunks)."""
    if rows >= m:
        out, failed = run(0, False)
        if bool(failed):            # the local solves' one synchronisation
            out, _ = run(0, True)
        return out
    starts = range(0, m, rows)
    outs, flags = zip(*map_chunks(lambda s: run(s, False), starts, device, graph))
    outs = list(outs)
    failed = torch.stack(flags)
    if bool(failed.any()):          # the local solves' one synchronisation
        for j in failed.nonzero().flatten().tolist():
            outs[j], _ = run(starts[j], True)
    return torch.cat(outs)
