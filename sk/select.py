"""The k smallest entries of each row of a score block: SK's selection step, tuned for the CPU."""
from __future__ import annotations

import torch
from torch import Tensor

try:  # optional: a faster selection on the CPU (see k_smallest)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed with torch almost everywhere
    _np = None

__all__ = ["k_smallest", "NUMPY_SELECT_ROWS", "NUMPY_SELECT_COLS"]

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
            or kk >= n or scores.dtype not in (torch.float32, torch.float64) or scores.requires_grad):
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
