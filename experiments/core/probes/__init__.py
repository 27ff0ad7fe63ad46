"""Readouts on fixed features, registered once and shared by the experiments (one probe, one function).

``registry``: ``register``, ``PROBES``, ``run_probe``, ``row``. ``protocol``: ``ProbeTask`` (what every
probe of a comparison sees), ``Selection`` (the data hyperparameters are chosen on: ``holdout``,
``stratified_kfold``, or ``none``), ``choose`` (the one selection rule), ``ProbeResult``. The probes:
``sk`` (SK classifier, nothing trained), ``knn`` (DINO's weighted vote), ``ncm`` (nearest class mean),
``linear`` (logistic regression), ``mlp`` (one hidden layer), ``finetune`` (the backbone's last block).

How to add a probe: a function ``probe(task, *, grid, default, **knobs) -> ProbeResult`` registered with
``@register(name, label=..., trained=...)`` in a module imported below, a config file
``configs/probe/<name>.yaml`` (its grid, its default, its knobs), and one line in an experiment overlay's
defaults (``- /probe@probe.<name>: <name>``).
"""
from experiments.core.probes import finetune, knn, linear, mlp, sk  # noqa: F401  (register the probes)
from experiments.core.probes.protocol import (ProbeResult, ProbeTask, Selection, accuracy, choose, correct,
                                              elapsed, grid_settings, holdout, stratified_kfold)
from experiments.core.probes.registry import PROBES, Probe, get, register, row, run_probe

__all__ = ["PROBES", "Probe", "ProbeResult", "ProbeTask", "Selection", "accuracy", "choose", "correct", "elapsed",
           "get", "grid_settings", "holdout", "register", "row", "run_probe", "stratified_kfold"]
