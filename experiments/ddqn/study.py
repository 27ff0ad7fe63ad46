"""The study's protocol: every agent's own knobs chosen on tuning seeds, apart from the reported seeds.

``exp.tuning`` (``configs/exp/ddqn.yaml``) says which knobs each agent tunes and the settings it tries (the
first: the defaults), on which environments and seeds, and under which profile the tuning runs are
recorded (the same budgets as the reported profile). The tuning runs write ordinary records; ``select``
reads them and picks, for each agent, the setting with the highest mean normalised area under the
learning curve (``RULE``); the reported sweep (``scripts/ddqn_study.py run``) passes the chosen values on
the command line, and the report (``experiments/reports/ddqn.py``) recomputes the choice from the tuning
records and checks every reported run's values against it.

Nothing here imports torch: the report and the driver script both use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

RULE = ("the setting with the highest mean, over the tuning environments, of its mean normalised area under "
        "the learning curve over the tuning seeds; ties go to the earlier setting (the defaults first)")


@dataclass(frozen=True)
class Grid:
    """One agent's tuned knobs (config paths) and the settings it tries, each a tuple of their values."""

    agent: str
    knobs: tuple[str, ...]
    settings: tuple[tuple, ...]

    def overrides(self, setting: tuple) -> list[str]:
        """The command-line overrides that run ``setting``."""
        return [f"{k}={v}" for k, v in zip(self.knobs, setting)]

    def label(self, setting: tuple) -> str:
        """``mix=0.25, sk.head.k=8``: a setting as a table shows it."""
        return ", ".join(f"{short_path(k)}={v:g}" if isinstance(v, float) else f"{short_path(k)}={v}"
                         for k, v in zip(self.knobs, setting))


def short_path(path: str) -> str:
    """A knob's name in a table: ``exp.agents.<agent>.mix`` → ``mix``, ``exp.envs.<env>.x`` → ``x``,
    other paths whole (``sk.head.ridge``)."""
    parts = path.split(".")
    if parts[:2] in (["exp", "agents"], ["exp", "envs"]) and len(parts) > 3:
        return ".".join(parts[3:])
    return path


@dataclass(frozen=True)
class Tuning:
    """``exp.tuning``: the grids, the tuning environments and seeds, and the tuning runs' profile."""

    profile: str
    envs: tuple[str, ...]
    seeds: tuple[int, ...]
    grids: dict[str, Grid]

    @classmethod
    def from_config(cls, exp: dict) -> "Tuning":
        t = exp["tuning"]
        grids = {}
        for agent, g in dict(t["grid"]).items():
            knobs = tuple(g["knobs"])
            settings = tuple(tuple(s) for s in g["settings"])
            if not settings or any(len(s) != len(knobs) for s in settings):
                raise ValueError(f"exp.tuning.grid.{agent}: every setting needs one value per knob {list(knobs)}")
            grids[agent] = Grid(agent, knobs, settings)
        return cls(str(t["profile"]), tuple(t["envs"]), tuple(int(s) for s in t["seeds"]), grids)


def lookup(config: dict, path: str, default: Any = None) -> Any:
    """The value at a dotted ``path`` of a nested dict (``default`` where it is absent)."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def setting_of(record: dict, grid: Grid) -> tuple:
    """The values of ``grid``'s knobs in a record's config, as the grid writes them (numbers compare as
    numbers: 1 and 1.0 are the same setting)."""
    return tuple(_canonical(lookup(record["config"], k)) for k in grid.knobs)


def _canonical(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@dataclass
class Choice:
    """One agent's selection: every setting tried with its score and number of runs, the chosen one, and
    what choosing cost (tuning runs, their seconds)."""

    agent: str
    grid: Grid
    scores: list[tuple[tuple, float, int]] = field(default_factory=list)  # (setting, score, runs)
    chosen: tuple | None = None
    runs: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)  # (setting, env, seed) without a record

    @property
    def complete(self) -> bool:
        return not self.missing


def select(records: list[dict], tuning: Tuning, normalised_auc) -> dict[str, Choice]:
    """Per agent of ``tuning.grids``: the choice by ``RULE`` among its tuning records (``records``: any
    records; those of the tuning profile, envs, seeds and agent are used). ``normalised_auc(record)``
    gives a record's normalised area under its learning curve (None when it cannot be normalised)."""
    out = {}
    for agent, grid in tuning.grids.items():
        choice = Choice(agent, grid)
        canonical = [tuple(_canonical(v) for v in s) for s in grid.settings]
        found: dict[tuple, dict] = {}  # (setting, env, seed) -> newest record
        for rec in records:
            row = rec["rows"][0]["keys"]
            if rec.get("profile") != tuning.profile or row.get("agent") != agent or row.get("env") not in tuning.envs \
                    or rec.get("seed") not in tuning.seeds:
                continue
            key = (setting_of(rec, grid), row["env"], rec["seed"])
            if key not in found or rec.get("started_utc", "") > found[key].get("started_utc", ""):
                found[key] = rec
        choice.runs = len(found)
        choice.seconds = sum(float(r.get("duration_s", 0.0)) for r in found.values())
        for setting in canonical:
            per_env = []
            for env in tuning.envs:
                values = []
                for seed in tuning.seeds:
                    rec = found.get((setting, env, seed))
                    score = None if rec is None else normalised_auc(rec)
                    if score is None:
                        choice.missing.append(f"{grid.label(setting)} on {env}, seed {seed}")
                    else:
                        values.append(score)
                if values:
                    per_env.append(sum(values) / len(values))
            score = sum(per_env) / len(per_env) if len(per_env) == len(tuning.envs) else math.nan
            choice.scores.append((setting, score, sum(1 for k in found if k[0] == setting)))
        usable = [(s, v) for s, v, _ in choice.scores if not math.isnan(v)]
        if usable and choice.complete:
            best = max(v for _, v in usable)
            choice.chosen = next(s for s, v in usable if v == best)
        out[agent] = choice
    return out
