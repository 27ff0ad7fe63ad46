"""The benchmark's clock: interleaved medians, device synchronisation; number formatting and the log."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def log(msg: str) -> None:
    print(f"[bench_sk {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable):
    """(seconds, result) of one call of ``fn``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def device_timer(device: torch.device) -> Callable:
    """``timed`` that waits for the device's queued work before and after (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return timed

    def run(fn):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, out
    return run


def interleaved_medians(fns: dict, repeats: int, timer: Callable = timed) -> tuple[dict, dict]:
    """Median seconds of each function, and all its times; one warm-up each, then the functions
    alternate per repeat so that slow drifts of a shared machine hit them alike."""
    for fn in fns.values():
        timer(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn)[0])
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def ratio_spread(a: list[float], b: list[float]) -> tuple[float, float]:
    """The smallest and largest a_r / b_r over the interleaved repeats r (a repeat times a and b back to
    back, so a slow spell of a shared machine mostly hits both)."""
    ratios = [x / y for x, y in zip(a, b)]
    return min(ratios), max(ratios)


def target_verdict(ratio: float, spread: tuple[float, float], target: float) -> str:
    """"met" when the ratio of the medians and every repeat's ratio are within ``target``, "missed" when none
    is, "at the target" otherwise: the repeats fall on both sides, and this run does not tell the two apart."""
    lo, hi = spread
    if ratio <= target and hi <= target:
        return "met"
    if ratio > target and lo > target:
        return "missed"
    return "at the target"


def verdict_text(ratio: float, spread: tuple[float, float], target: float) -> str:
    """``<= target: verdict (repeats lo-hi)``, the form the reports print."""
    return f"<= {target:g}: {target_verdict(ratio, spread, target)} (repeats {spread[0]:.3f}-{spread[1]:.3f})"


def one_thread(fn: Callable):
    """``fn()`` run with one torch thread, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def heading(title: str, *paragraphs: str) -> list[str]:
    """A report section's first lines: ``## title`` and its paragraphs, each followed by a blank line."""
    out = [f"## {title}", ""]
    for p in paragraphs:
        out += [p, ""]
    return out


def fmt_s(sec: float) -> str:
    """Seconds to 4 significant digits, so that ratios of printed times match the printed ratios."""
    return f"{sec:.4g}" if sec < 1000 else f"{sec:.0f}"
