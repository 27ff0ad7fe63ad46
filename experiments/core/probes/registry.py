"""The probe registry: every readout on fixed features, registered once by name.

A probe is a function ``probe(task: ProbeTask, **options) -> ProbeResult`` registered with
``@register(name, label=..., trained=...)``; its options (its selection ``grid``, the ``default`` setting
where nothing can be validated, and its own fixed knobs) come from ``configs/probe/<name>.yaml`` (SK's from
the ``sk`` group), read by ``experiments.core.config.probe_options``. An experiment names the probes it runs
in its overlay (one ``- /probe@probe.<name>: <name>`` line each) and calls ``run_probe`` for each on one
``ProbeTask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from experiments.core.probes.protocol import ProbeResult, ProbeTask


@dataclass(frozen=True)
class Probe:
    name: str
    label: str                 # how tables and comparisons name it ("k-NN")
    trained: bool              # fits parameters by gradient or optimisation (drawn dashed in figures)
    fn: Callable[..., ProbeResult]
    grid_field: str = "selection_scores"  # the row field holding every setting's selection score


PROBES: dict[str, Probe] = {}


def register(name: str, *, label: str, trained: bool, grid_field: str = "selection_scores"):
    """Decorator: register ``fn`` as the probe ``name``."""

    def wrap(fn):
        if name in PROBES:
            raise ValueError(f"probe {name!r} is registered twice")
        PROBES[name] = Probe(name, label, trained, fn, grid_field)
        return fn

    return wrap


def get(name: str) -> Probe:
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}: registered are {', '.join(PROBES)}")
    return PROBES[name]


def run_probe(name: str, task: ProbeTask, options: dict) -> ProbeResult:
    """Probe ``name`` on ``task`` with its ``options`` (``probe_options(cfg)[name]``)."""
    return get(name).fn(task, **options)


def row(name: str, result: ProbeResult, keys: dict, info: dict | None = None) -> dict:
    """The table row of one probe's result (its selection scores under the probe's grid field)."""
    return result.row(keys, info, grid_field=get(name).grid_field)
