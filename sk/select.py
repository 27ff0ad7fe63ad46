"""The k smallest entries of each row of a score block: SK's selection step, tuned for the CPU."""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from .functions import functorch_active

try:  # optional: a faster selection on the CPU (see k_smallest)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed with torch almost everywhere
    _np = None

__all__ = ["k_smallest", "k_smallest_ordered", "NUMPY_SELECT_ROWS", "NUMPY_SELECT_COLS"]

# CPU blocks of at least this many rows, and of at most NUMPY_SELECT_COLS support points, select with
# numpy (see k_smallest).
NUMPY_SELECT_ROWS = 32
NUMPY_SELECT_COLS = 4096


def k_smallest(scores: Tensor, kk: int) -> tuple[Tensor, Tensor]:
    """The kk smallest entries of each row of scores (B, N), sorted ascending: values and indices. Equal
    values come in either order (callers check for ties themselves).

    ``torch.topk`` runs, per row, an ``nth_element`` whose comparisons mispredict on data it has not seen:
    at N = 256, kk = 17, 64 rows of fresh scores took 173-190 us on this project's CPU (43 us on a block
    it had seen before), and numpy's ``argpartition``, which moves the positions along, 163 us. numpy's
    ``partition`` of the values alone took 42 us: so the kk-th smallest value t of each row is found that
    way, the entries <= t (exactly kk a row unless t is tied) with one ``flatnonzero`` of the whole block,
    and the kk winners of each row are sorted: 85 us in all. A block where some t is tied, small blocks
    (fewer than ``NUMPY_SELECT_ROWS`` rows, where the conversions dominate), larger supports (more than
    ``NUMPY_SELECT_COLS`` columns: numpy's int64 positions), other devices and dtypes use ``topk``.
    """
    b, n = scores.shape
    if (_np is None or scores.device.type != "cpu" or b < NUMPY_SELECT_ROWS or n > NUMPY_SELECT_COLS
            or kk >= n or scores.dtype not in (torch.float32, torch.float64) or scores.requires_grad
            or functorch_active()):
        return torch.topk(scores, kk, dim=1, largest=False)
    s = scores.numpy()
    flat = _np.flatnonzero(s <= _np.partition(s, kk - 1, axis=1)[:, kk - 1:kk])   # row by row
    if flat.size != b * kk:                     # a tie at some row's kk-th value
        return torch.topk(scores, kk, dim=1, largest=False)
    values = s.ravel()[flat].reshape(b, kk)
    order = _np.argsort(values, axis=1)
    cols = (flat % n).reshape(b, kk)
    return (torch.from_numpy(_np.take_along_axis(values, order, 1)),
            torch.from_numpy(_np.take_along_axis(cols, order, 1)))


# CPU float32 blocks whose rows have at most this many columns are sorted whole by k_smallest_ordered;
# wider rows are partitioned first. Row slices keep its int64 keys within KEY_BLOCK_ELEMENTS.
SORT_COLS = 1024
SORT_ROWS = 2                  # blocks of at most this many rows: topk and a tie check (k_smallest_ordered)
KEY_BLOCK_ELEMENTS = 1 << 17


def k_smallest_ordered(scores: Tensor, kk: int) -> tuple[Tensor, Tensor] | None:
    """The kk smallest entries of each row of scores (B, N), ordered by (value, column): among equal values
    the lower column comes first, exactly as the contract ranks. None where it does not apply (not a CPU
    float32 or float64 block, kk >= N, more than ``NUMPY_SELECT_COLS`` columns, numpy missing, a graph, a
    ``torch.func`` transform (its tensors have no storage), a big-endian host; for float64, a block where
    two of some row's kk + 1 smallest round to one float32): the caller then selects and checks ties itself.

    Each entry becomes one int64 key, its float32 bits (non-negative scores order as their bits, the sign
    bit cleared so that -0.0 is 0.0) above its column, and numpy sorts the keys (SIMD: at N = 256, kk = 17,
    64 rows of fresh scores took 47 us, where ``k_smallest`` took 131 us and a tie check after it a host
    read). Keys are unique, so the order needs no tie check and no redo. Float64 scores are keyed by their
    float32 rounding, which is monotone: when a row's kk + 1 smallest rounded values are distinct, their
    order is the float64 order, and the values are read from the float64 block. Scores must be >= 0 or
    -0.0 (the searches clamp them); NaN and +inf order last, as in ``topk``. Wider rows (more than
    ``SORT_COLS``) are partitioned first; keys are made a slice of rows at a time (``KEY_BLOCK_ELEMENTS``).
    Blocks of at most ``SORT_ROWS`` rows take ``topk`` of kk + 1 instead (the conversions would cost more
    than the selection: 5 us against 15 us for a stable sort of one row of 256), read back to look for
    equal values among them; a row with one is sorted stably (the same order as the keys).
    """
    b, n = scores.shape
    if (_np is None or scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64)
            or kk >= n or n > NUMPY_SELECT_COLS or scores.requires_grad or b == 0 or functorch_active()
            or sys.byteorder != "little"):
        return None
    if b <= SORT_ROWS:        # a row or two: topk, whose ties are checked in Python (a CPU read is free)
        v, i = torch.topk(scores, kk + 1, dim=1, largest=False)
        if any(r[j] == r[j + 1] for r in v.tolist() for j in range(kk)):
            v, i = torch.sort(scores, dim=1, stable=True)       # equal values: index order
        return v[:, :kk], i[:, :kk]
    s = scores.contiguous().numpy()
    wide = s.dtype == _np.float64
    cols = _np.arange(n, dtype=_np.int32)
    step = max(1, KEY_BLOCK_ELEMENTS // n)
    parts = [_ordered_keys(s[r:r + step], kk, cols, wide) for r in range(0, b, step)]
    if any(p is None for p in parts):
        return None
    vals, idx = parts[0] if len(parts) == 1 else (_np.concatenate(q) for q in zip(*parts))
    return torch.from_numpy(vals), torch.from_numpy(idx)


def _ordered_keys(rows, kk: int, cols, wide: bool):
    """``k_smallest_ordered`` of a slice of rows (a numpy array): (values, int64 columns), or None for a
    float64 slice with equal float32 roundings among a row's kk + 1 smallest."""
    r32 = rows.astype(_np.float32) if wide else rows
    key = _np.empty(rows.shape, dtype=_np.int64)
    halves = key.view(_np.int32).reshape(*rows.shape, 2)        # little-endian: (column, bits)
    halves[:, :, 0] = cols
    _np.bitwise_and(r32.view(_np.int32), 0x7FFFFFFF, out=halves[:, :, 1])
    if rows.shape[1] > SORT_COLS:
        key = _np.partition(key, kk, axis=1)[:, :kk + 1]
    key.sort(axis=1)
    top = key[:, :kk + 1].view(_np.int32).reshape(key.shape[0], kk + 1, 2)
    idx = top[:, :kk, 0].astype(_np.int64)
    if not wide:
        return top[:, :kk, 1].copy().view(_np.float32), idx
    if (top[:, 1:, 1] == top[:, :-1, 1]).any():       # equal roundings: the float64 order is unknown
        return None
    return _np.take_along_axis(rows, idx, 1), idx
