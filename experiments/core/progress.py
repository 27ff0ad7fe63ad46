"""Progress bars for long work (feature extraction, training, long evaluations)."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _disabled() -> bool:
    return os.environ.get("SK_NO_PROGRESS") == "1" or (os.environ.get("CI") == "true" and not sys.stderr.isatty())


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    """A tqdm bar on stderr; silent when SK_NO_PROGRESS=1 or stderr is not a terminal in CI."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_disabled(), dynamic_ncols=True)


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "it", leave: bool = False) -> tqdm:
    """A bar advanced by hand (``bar.update(n)``, ``bar.set_postfix(...)``, then ``bar.close()``), for loops
    that are not one iterable (an RL agent's env steps); silent under the same conditions as ``progress``."""
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, leave=leave, disable=_disabled(),
                dynamic_ncols=True)
