r"""A support larger than memory: ``sk.FileSupport``, searched exactly in blocks read from its file.

The support X (N, d) lives in a file: a ``.npy`` file (``numpy.save``, or ``numpy.lib.format.open_memmap``
filled a block at a time), a ``numpy.memmap``, or a raw row-major file given with its shape and dtype;
float16, bfloat16 (raw files only), float32 or float64. ``FileSupport(path).search(z, k)`` finds the k
nearest rows of every query exactly, reading the file one block of rows at a time into **one buffer reused
for every block** (a plain read, not a memory map): memory holds that buffer, one score block of the search
and the (M, k) results, whatever N. A memory map would fill the process's resident set with every page it
touched until the kernel chose to drop them; a read into a buffer leaves the file's pages in the page
cache, which the kernel reclaims (they are not the process's memory).

Search. Per block B of rows (default: ``sk.budget``'s search budget in bytes of rows),
``sk.knn_search(z, X_B, k)`` gives each query's k nearest in the block (its scores, ties to the lower
index), and the running (M, k) answer is merged with them by (distance, index) (``sk.index.merge_nearest``).
The result equals ``sk.knn_search(z, X, k)`` on the whole support held in memory, up to the matmul's
rounding of the same scores. The file is read once per search, whatever M: the queries are the inner loop.

SK. ``FileSupport.sparse_krr(z, y, k, ...)`` searches, reads the rows of the winners (each distinct row
once), and calls ``sk.sparse_krr`` on them with ``indices=``: the same arithmetic as ``sk.sparse_krr(z, X,
y, k, ...)`` on the whole support. Targets or labels ``y`` are an ordinary tensor (N rows; a
``torch.from_file`` map works too: only the winners' rows are read). ``lengthscale="auto"`` would see only
the winners: resolve it first with ``FileSupport.auto_lengthscale(k)``, the rule of ``sk.auto_lengthscale``
over the whole file. No gradient reaches X (it is a file).

Example::

    bank = sk.FileSupport("features.npy")                    # (N, d) float16, N beyond memory
    ls = bank.auto_lengthscale(k=32)
    scores = bank.sparse_krr(queries, labels, k=32, num_classes=1000, lengthscale=ls)
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from .budget import search_block_bytes
from .index import merge_nearest
from .knn import knn_search

__all__ = ["FileSupport", "lengthscale_rule", "krr_on_rows"]

_NPY_DTYPES = {"<f2": torch.float16, "<f4": torch.float32, "<f8": torch.float64}
_FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file (format versions 1-3), without numpy."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic[:6] != b"\x93NUMPY":
            raise ValueError(f"{path} is not a .npy file (no NUMPY magic); give shape= and dtype= for a raw file")
        size_bytes = 2 if magic[6] == 1 else 4
        header_len = int.from_bytes(f.read(size_bytes), "little")
        header = ast.literal_eval(f.read(header_len).decode("latin1"))
    if header.get("fortran_order"):
        raise ValueError(f"{path}: a Fortran-order array cannot be read a block of rows at a time; save it C-order")
    descr = header.get("descr")
    if descr not in _NPY_DTYPES:
        raise ValueError(f"{path}: dtype {descr!r} is not supported; use little-endian float16, float32 or float64")
    return tuple(header["shape"]), _NPY_DTYPES[descr], 8 + size_bytes + header_len


def _read_exactly(f, view: memoryview, offset: int) -> None:
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"unexpected end of file in {f.name} at byte {offset + done}")
        done += got


class FileSupport:
    """A support X (N, d) stored in a file and searched exactly a block of rows at a time (module doc).

    Args:
        source: a path to a ``.npy`` file or to a raw row-major file, or a ``numpy.memmap`` (its file,
            offset, shape and dtype are used; it is not read through the map).
        shape, dtype: (N, d) and the torch dtype of a raw file (from the header for ``.npy``).
        offset: byte offset of the data in a raw file.
        block_rows: rows per block (default: the device's search budget in bytes of rows, ``sk.budget``).

    Attributes: ``path``, ``n``, ``d``, ``dtype``, ``offset``.
    """

    def __init__(self, source, shape: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
                 offset: int = 0, block_rows: int | None = None):
        if hasattr(source, "filename") and hasattr(source, "offset"):        # a numpy.memmap
            shape, offset = tuple(source.shape), int(source.offset)
            dtype = _NPY_DTYPES.get(source.dtype.str)
            source = source.filename
        self.path = Path(source)
        if not self.path.is_file():
            raise ValueError(f"no such file: {self.path}")
        if shape is None and dtype is None:
            shape, dtype, offset = _read_npy_header(self.path)
        if shape is None or dtype not in _FILE_DTYPES:
            raise ValueError(f"a raw file needs shape=(N, d) and dtype in {_FILE_DTYPES}, got {shape} and {dtype}")
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"the support must be 2-D (N, d) with N, d >= 1, got shape {tuple(shape)}")
        self.n, self.d = int(shape[0]), int(shape[1])
        self.dtype, self.offset = dtype, int(offset)
        self._row_bytes = self.d * torch.finfo(dtype).bits // 8
        if self.path.stat().st_size < self.offset + self.n * self._row_bytes:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size} bytes, fewer than its {self.n} x "
                             f"{self.d} {dtype} rows from byte {self.offset}")
        if block_rows is not None and (isinstance(block_rows, bool) or int(block_rows) < 1):
            raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}")
        self.block_rows = None if block_rows is None else int(block_rows)

    def __repr__(self) -> str:
        return f"FileSupport({str(self.path)!r}, n={self.n}, d={self.d}, dtype={self.dtype})"

    def _block_rows(self, device: torch.device) -> int:
        return min(self.n, self.block_rows or max(1, search_block_bytes(device) // self._row_bytes))

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """(start, rows (B, d)) for consecutive blocks of the file. Every block is a view of the same
        buffer, overwritten by the next one: copy what must outlive the iteration."""
        rows = block_rows or self._block_rows(torch.device("cpu"))
        raw = bytearray(rows * self._row_bytes)
        buffer = torch.frombuffer(raw, dtype=self.dtype).view(rows, self.d)
        view = memoryview(raw)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, self.n, rows):
                stop = min(start + rows, self.n)
                _read_exactly(f, view[:(stop - start) * self._row_bytes], self.offset + start * self._row_bytes)
                yield start, buffer[:stop - start]

    def rows(self, idx: Tensor) -> Tensor:
        """The rows idx (U,) of X as a new (U, d) tensor (one read per run of consecutive indices)."""
        idx = idx.detach().to("cpu", torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise ValueError(f"row indices out of range [0, {self.n})")
        raw = bytearray(idx.numel() * self._row_bytes)
        view = memoryview(raw)
        order = torch.argsort(idx)
        sorted_idx = idx[order].tolist()
        with open(self.path, "rb", buffering=0) as f:
            s = 0
            while s < len(sorted_idx):
                e = s + 1
                while e < len(sorted_idx) and sorted_idx[e] == sorted_idx[e - 1] + 1:
                    e += 1
                _read_exactly(f, view[s * self._row_bytes:e * self._row_bytes],
                              self.offset + sorted_idx[s] * self._row_bytes)
                s = e
        out = torch.frombuffer(raw, dtype=self.dtype).view(idx.numel(), self.d) if raw else \
            torch.empty(0, self.d, dtype=self.dtype)
        return out[torch.argsort(order)]

    @torch.no_grad()
    def search(self, z: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact k nearest rows of the file for each query: sq_dists (M, k') in z's dtype and indices
        (M, k') on z's device, k' = min(k, N), sorted by distance, ties by the lower index (module doc)."""
        if z.dim() != 2 or z.shape[1] != self.d:
            raise ValueError(f"feature size mismatch: z must be (M, d={self.d}), got shape {tuple(z.shape)}")
        kk = min(int(k), self.n)
        if kk < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        best_d, best_i = z.new_zeros(z.shape[0], 0), torch.zeros(z.shape[0], 0, dtype=torch.long, device=z.device)
        if z.shape[0] == 0:
            return z.new_zeros(0, kk), best_i.new_zeros(0, kk)
        for start, block in self.blocks(self._block_rows(z.device)):
            d2, idx = knn_search(z, block.to(z.device), kk)
            best_d, best_i = merge_nearest(torch.cat([best_d, d2], 1), torch.cat([best_i, idx + start], 1), kk)
        return best_d, best_i

    def auto_lengthscale(self, k: int = 32, max_points: int = 2048, seed: int = 0) -> float:
        """``sk.auto_lengthscale`` of the whole file (the same sample and rule; one pass over the file)."""
        return lengthscale_rule(self.n, k, max_points, seed,
                                lambda rows, kk: self.search(self.rows(rows), kk + 1)[0][:, kk])

    def sparse_krr(self, z: Tensor, y: Tensor, k: int = 32, continuous: bool = False, **options) -> Tensor:
        """``sk.sparse_krr(z, X, y, k, ...)`` with X this file: the exact search, then the local solves on
        the winners' rows. ``y``: (N, c) or (N,) targets or (N,) labels (with ``num_classes``); ``options``:
        the other arguments of ``sk.sparse_krr`` (kernel, lengthscale (a number), ridge, num_classes,
        solve_dtype, chunk_size, taper). Returns (M, c), (M, C) or (M,)."""
        if y.shape[0] != self.n:
            raise ValueError(f"y has {y.shape[0]} rows but the file support has {self.n}")
        need = min(k + 1 if continuous and k < self.n else k, self.n)
        _, winners = self.search(z, need)
        unique, local = torch.unique(winners, return_inverse=True)
        xs = self.rows(unique).to(z.device)
        return krr_on_rows(z, xs, y[unique.to(y.device)], local, k, continuous=continuous, **options)


def krr_on_rows(z: Tensor, xs: Tensor, ys: Tensor, local: Tensor, k: int, **options) -> Tensor:
    """``sk.sparse_krr`` on the rows (U, d) of a larger support that hold the neighbours of z, given as
    ``local`` (M, k') indices into them: the same arithmetic as on the whole support."""
    from .krr import sparse_krr  # noqa: PLC0415 - sk.krr imports sk.support, which imports sk.index lazily

    if isinstance(options.get("lengthscale"), str):
        raise ValueError("lengthscale='auto' would be computed on the neighbours' rows only: resolve it over the "
                         "whole support first (FileSupport.auto_lengthscale / ShardedSupport.auto_lengthscale) "
                         "and pass the number")
    if z.shape[0] == 0:
        c = options["num_classes"] if options.get("num_classes") is not None else (ys.shape[1] if ys.dim() == 2 else 0)
        out = z.new_zeros((0, c) if c else (0,))
        # The graph must still reach the rows, so that every rank's backward takes part in the exchanges
        # (and z gets its empty gradient).
        for t in (z, xs, ys):
            if t.requires_grad:
                out = out + 0.0 * t.sum()
        return out
    return sparse_krr(z, xs, ys, k=k, indices=local, **options)


def lengthscale_rule(n: int, k: int, max_points: int, seed: int,
                     kth_sq_dist: Callable[[Tensor, int], Tensor]) -> float:
    """``sk.auto_lengthscale``'s rule for a support that is not one tensor: the median distance from up to
    ``max_points`` support points (a fixed-seed sample) to their k-th nearest other support point.

    ``kth_sq_dist(rows, kk)`` returns the squared distance from each sampled row (global indices (S,)) to
    its (kk + 1)-th nearest support point (the point itself comes first). Returns 1.0 when no positive
    distance exists."""
    if n < 2:
        return 1.0
    kk = max(1, min(int(k), n - 1))
    if n > max_points:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points]
    else:
        rows = torch.arange(n)
    d2 = kth_sq_dist(rows, kk)
    kth = d2.to(torch.promote_types(d2.dtype, torch.float32)).sqrt()
    kth = kth[kth > 0]
    return float(kth.median()) if kth.numel() else 1.0
