"""On-disk cache of expensive artefacts (frozen-backbone features, pretrained checkpoints).

An entry's key is a SHA-256 over a canonical JSON of everything that determines it: the backbone and
its configuration, a fingerprint of its weights, the data split and the preprocessing, which the caller
passes as ``parts``, and the code that computed it, which ``FeatureCache`` adds by itself: a fingerprint
of the project's shared sources (``sk/``, ``experiments/core/``, ``experiments/backbones/``), of the
module that called the cache and of every project module on the call stack (the experiment, however it
reached the cache), and of the torch version. A changed part or an edited
source file gives a new key, so a stale entry is never reused (old entries stay on disk until
``make clean``). Each entry stores its key parts beside it and they are checked again on load.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from experiments.core.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[2]
# Sources whose code can change any artefact: the library, the shared run machinery, the backbones.
SHARED_CODE = [ROOT / "sk", ROOT / "experiments" / "core", ROOT / "experiments" / "backbones"]
# Project code whose modules count when they are on the call stack of a cache request.
PROJECT_CODE = [ROOT / "sk", ROOT / "experiments", ROOT / "scripts"]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return tensor_fingerprint(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return obj  # keep 1.0 distinct from 1 only through JSON's own rules
    return obj


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(_canonical(parts), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tensor_fingerprint(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim tensors (BN counters) cannot be viewed as bytes
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's class, parameter and buffer values: identifies its weights."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(paths: Iterable[str | Path]) -> str:
    """Hash of the ``.py`` files at ``paths`` (files, or folders searched recursively): names and contents."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(ROOT).as_posix().encode() if f.is_relative_to(ROOT) else f.name.encode())
            h.update(f.read_bytes() if f.is_file() else b"<no file>")
    return h.hexdigest()


def code_fingerprint(callers: Iterable[str | Path] = ()) -> str:
    """Fingerprint of the code behind an artefact: ``SHARED_CODE``, the ``callers``' files, torch's version."""
    paths = SHARED_CODE + sorted({Path(c) for c in callers})
    return cache_key({"sources": source_fingerprint(paths), "torch": torch.__version__})


def _caller_files() -> list[str]:
    """The files of the code that asked the cache: the innermost frame outside this module (wherever it
    is), and every frame of project code (``PROJECT_CODE``) above it."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    files = [frame.f_code.co_filename] if frame is not None else []
    while frame is not None:
        name = frame.f_code.co_filename
        if any(Path(name).is_relative_to(p) for p in PROJECT_CODE):
            files.append(name)
        frame = frame.f_back
    return files


class FeatureCache:
    """``get_or_compute(parts, fn)`` returns ``fn()``'s result, computed once per distinct ``parts`` and code.

    ``code``: None (the default) keys every entry by ``code_fingerprint`` of the code asking the cache
    (``_caller_files``); a string replaces that fingerprint (a caller that fingerprints its code itself).
    """

    def __init__(self, root: str | Path, enabled: bool = True, code: str | None = None):
        self.root = Path(root)
        self.enabled = enabled
        self.code = code

    def _keyed(self, parts: dict[str, Any]) -> dict[str, Any]:
        if "_code" in parts:
            raise ValueError("cache parts may not use the name '_code': the cache adds the code fingerprint")
        return {**parts, "_code": self.code if self.code is not None else code_fingerprint(_caller_files())}

    def path(self, parts: dict[str, Any]) -> Path:
        return self._path(self._keyed(parts))

    def _path(self, keyed: dict[str, Any]) -> Path:
        return self.root / str(keyed.get("kind", "entry")) / f"{cache_key(keyed)}.pt"

    def load(self, parts: dict[str, Any]) -> Any | None:
        return self._load(self._keyed(parts))

    def _load(self, keyed: dict[str, Any]) -> Any | None:
        p = self._path(keyed)
        if not (self.enabled and p.exists()):
            return None
        entry = torch.load(p, map_location="cpu", weights_only=False)
        if entry.get("parts") != json.loads(json.dumps(_canonical(keyed), default=str)):
            raise RuntimeError(f"cache entry {p} does not match its key parts; delete it and rerun")
        return entry["value"]

    def save(self, parts: dict[str, Any], value: Any) -> Path:
        return self._save(self._keyed(parts), value)

    def _save(self, keyed: dict[str, Any], value: Any) -> Path:
        p = self._path(keyed)
        with atomic_write(p) as tmp:
            torch.save({"parts": json.loads(json.dumps(_canonical(keyed), default=str)), "value": value}, tmp)
        return p

    def get_or_compute(self, parts: dict[str, Any], fn: Callable[[], Any]) -> Any:
        keyed = self._keyed(parts)  # fingerprinted once, before fn() runs
        value = self._load(keyed)
        if value is None:
            value = fn()
            if self.enabled:
                self._save(keyed, value)
        return value
