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
