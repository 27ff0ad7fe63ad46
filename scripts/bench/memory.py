"""Section 4: SK's peak memory at a size where a dense M x N matrix would not fit, measured in a fresh
subprocess (``python -m scripts.bench.memory CONFIG``): VmHWM minus the RSS with the inputs made."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sk

from .timing import fmt_s, heading, log, timed

ROOT = Path(__file__).resolve().parents[2]


def section(sizes: dict, threads: int) -> list[str]:
    res = measure(sizes["memory"], threads)
    log(f"peak increase {res['increase_gib']:.2f} GiB in {res['seconds']:.1f}s")
    return lines(res)


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_case(M: int, N: int, d: int, k: int, classes: int, threads: int) -> dict:  # noqa: N803
    """Run inside the subprocess: inputs, baseline RSS, SK, peak RSS (VmHWM)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, d, generator=g)
    z = torch.randn(M, d, generator=g)
    y = F.one_hot(torch.randint(0, classes, (N,), generator=g), classes).float()
    ls = sk.auto_lengthscale(x, k=k)
    base = proc_status_kib("VmRSS")
    hwm_before = proc_status_kib("VmHWM")
    try:  # reset the peak to the current RSS (Linux >= 4.0), so VmHWM measures from here
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t, f = timed(lambda: sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3))
    assert torch.isfinite(f).all()
    return {"baseline_rss_kib": base, "hwm_kib": proc_status_kib("VmHWM"), "hwm_before_kib": hwm_before,
            "peak_reset": reset, "seconds": t, "output_shape": list(f.shape)}


def measure(cfg: dict, threads: int) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench.memory", json.dumps({**cfg, "threads": threads})]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"memory case failed:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["increase_gib"] = (out["hwm_kib"] - out["baseline_rss_kib"]) / 2 ** 20
    out["dense_gib"] = cfg["M"] * cfg["N"] * 4 / 2 ** 30
    out["config"] = cfg
    return out


def lines(mres: dict) -> list[str]:
    c = mres["config"]
    return heading(
        "4. Peak memory",
        f"M={c['M']}, N={c['N']}, d={c['d']}, k={c['k']}, {c['classes']} one-hot targets, float32, in a fresh "
        f"subprocess: peak RSS (VmHWM{' reset after the inputs were made' if mres['peak_reset'] else ''}) minus "
        f"the RSS with the inputs made.") + [
        "| baseline RSS | peak RSS | increase | time | a dense M x N float32 matrix would need |",
        "|---|---|---|---|---|",
        f"| {mres['baseline_rss_kib'] / 2 ** 20:.3f} GiB | {mres['hwm_kib'] / 2 ** 20:.3f} GiB | "
        f"**{mres['increase_gib']:.3f} GiB** | {fmt_s(mres['seconds'])} s | {mres['dense_gib']:.3g} GiB |",
        "",
        "Target: increase <= 3 GiB.",
        "",
    ]


if __name__ == "__main__":
    print(json.dumps(memory_case(**json.loads(sys.argv[1]))))
