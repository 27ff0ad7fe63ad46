"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

``atomic_write(path)`` is the one way this repository writes a file that someone may read while it is
being written (run records, the feature cache, checkpoints, tables, figures, benchmark reports)::

    with atomic_write(path) as tmp:          # tmp: a fresh name in path's folder
        tmp.write_text(text)                 # or torch.save(obj, tmp), fig.savefig(tmp), ...

The body writes to ``tmp``; on success the file is flushed to disk and renamed onto ``path``
(``os.replace``, atomic within one file system, hence the same folder); on an exception it is deleted
and ``path`` is left as it was. Several files that must appear together (a table and its figure) nest
their ``atomic_write`` blocks in one ``contextlib.ExitStack``: nothing is renamed unless every body
succeeded.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    ``suffix`` ends the temporary name: the default ``.tmp`` keeps half-written files out of globs such
    as ``*.json``; pass the real extension where the writer infers the format from it (``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
