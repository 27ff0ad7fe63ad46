"""On-disk cache of expensive artefacts (frozen-backbone features, pretrained checkpoints).

An entry's key is a SHA-256 over a canonical JSON of everything that determines it: the backbone and
its configuration, a fingerprint of its weights, the data split and the preprocessing. A changed part
gives a new key, so a stale entry is never reused. Each entry stores its key parts beside it and they
are checked again on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


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


class FeatureCache:
    """``get_or_compute(parts, fn)`` returns ``fn()``'s result, computed once per distinct ``parts``."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def path(self, parts: dict[str, Any]) -> Path:
        key = cache_key(parts)
        name = str(parts.get("kind", "entry"))
        return self.root / name / f"{key}.pt"

    def load(self, parts: dict[str, Any]) -> Any | None:
        p = self.path(parts)
        if not (self.enabled and p.exists()):
            return None
        entry = torch.load(p, map_location="cpu", weights_only=False)
        if entry.get("parts") != json.loads(json.dumps(_canonical(parts), default=str)):
            raise RuntimeError(f"cache entry {p} does not match its key parts; delete it and rerun")
        return entry["value"]

    def save(self, parts: dict[str, Any], value: Any) -> Path:
        p = self.path(parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"parts": json.loads(json.dumps(_canonical(parts), default=str)), "value": value}, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return p

    def get_or_compute(self, parts: dict[str, Any], fn: Callable[[], Any]) -> Any:
        value = self.load(parts)
        if value is None:
            value = fn()
            if self.enabled:
                self.save(parts, value)
        return value
