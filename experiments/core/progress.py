"""Progress bars for long work (feature extraction, training, long evaluations)."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    """A tqdm bar on stderr; silent when SK_NO_PROGRESS=1 or stderr is not a terminal in CI."""
    disable = os.environ.get("SK_NO_PROGRESS") == "1" or (os.environ.get("CI") == "true" and not sys.stderr.isatty())
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True)
