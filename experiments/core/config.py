"""The config line: where Hydra nodes become the plain keyword arguments of the functions below it.

Experiments read ``cfg`` in their ``run`` and pass values on; probes, tuners and training helpers never
take a config node. ``sk_options`` is the one reading of the ``sk`` group's probe keys
(configs/sk/default.yaml documents them).
"""
from __future__ import annotations

from typing import Any

GRID_KEYS = ("k", "kernel", "lengthscale_mult", "ridge")


def lengthscale_value(value: Any) -> float | str:
    """A config lengthscale: the string ``auto`` or a number."""
    return "auto" if str(value) == "auto" else float(value)


def sk_options(cfg_sk) -> dict[str, Any]:
    """``cfg.sk`` as ``sk_probe``'s keyword arguments.

    The fixed setting (k, kernel, lengthscale, ridge), ``normalize`` and ``backend`` always; ``grid``
    (lists for k, kernel, lengthscale_mult, ridge) when ``sk.tune`` is true, None when it is false, so
    that ``sk.tune=false`` means the fixed setting wherever the options go.
    """
    grid = {key: list(cfg_sk.grid[key]) for key in GRID_KEYS} if bool(cfg_sk.tune) else None
    return {"k": int(cfg_sk.k), "kernel": str(cfg_sk.kernel), "lengthscale": lengthscale_value(cfg_sk.lengthscale),
            "ridge": float(cfg_sk.ridge), "grid": grid, "normalize": bool(cfg_sk.normalize),
            "backend": str(cfg_sk.backend)}


def sk_probe_options(cfg_sk) -> dict[str, Any]:
    """The SK probe's options (``experiments.core.probes.sk``) from the ``sk`` group: its grid (None with
    ``sk.tune=false``), its default (the fixed setting), ``normalize`` and ``backend``."""
    o = sk_options(cfg_sk)
    return {"grid": o["grid"], "default": {k: o[k] for k in ("k", "kernel", "lengthscale", "ridge")},
            "normalize": o["normalize"], "backend": o["backend"]}


def probe_options(cfg) -> dict[str, dict[str, Any]]:
    """{probe name: its keyword arguments} for the probes the experiment's overlay names under ``probe``
    (in their order): the one reader of ``configs/probe/<name>.yaml`` (SK's options from ``sk``)."""
    from omegaconf import OmegaConf

    from experiments.core.probes import get

    out = {}
    for name in (cfg.get("probe") or {}):
        get(name)  # an unknown probe fails here, naming the registered ones
        out[name] = sk_probe_options(cfg.sk) if name == "sk" else dict(OmegaConf.to_container(cfg.probe[name], resolve=True))
    return out
