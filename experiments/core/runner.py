"""One run of one experiment: config checks, seeding, device, tracker, and the run record.

``run_experiment(cfg)`` is what ``experiments/run.py`` calls inside ``@hydra.main``. It imports
``experiments.<exp.name>``, calls its ``run(cfg, ctx)``, and writes the returned rows as a JSON record
under ``results/runs/<exp.name>/<profile>/`` (atomically). Nothing is written if the run fails.
"""
from __future__ import annotations

import importlib
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.core.cache import FeatureCache
from experiments.core.logging import make_logger
from experiments.core.progress import progress
from experiments.core.records import atomic_write_json, config_id, git_commit, load_average, machine_info

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def known_experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available here (use device=auto or device=cpu)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    return torch.device(name)


@dataclass
class RunContext:
    """What an experiment's ``run(cfg, ctx)`` gets besides its config."""

    device: torch.device
    seed: int
    paths: SimpleNamespace
    cache: FeatureCache
    log: Callable[..., None]

    def progress(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
        return progress(iterable, desc=desc, total=total)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)


def _hydra_info() -> tuple[str, str, str | None, int]:
    """(command, output dir, sweep id or None, jobs the launcher runs at a time) of the current Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        command = "python experiments/run.py " + " ".join(hc.overrides.task)
        out = hc.runtime.output_dir
        sweep = None
        if hc.mode == RunMode.MULTIRUN:
            sweep = Path(hc.sweep.dir).name.replace(os.sep, "-")
            sweep = f"{Path(hc.sweep.dir).parent.name}_{sweep}"
        jobs = int(hc.launcher.get("n_jobs") or 1) if hc.mode == RunMode.MULTIRUN else 1
        return command, out, sweep, max(jobs, 1)
    except (ValueError, ImportError):
        return "python " + " ".join(sys.argv), os.getcwd(), None, 1


def run_experiment(cfg: DictConfig) -> float | None:
    if cfg.get("exp") is None:
        raise ValueError("no experiment chosen: add +exp=NAME, one of: " + ", ".join(known_experiments()))
    name = cfg.exp.get("name")
    if name not in known_experiments():
        raise ValueError(f"unknown experiment {name!r}: known are " + ", ".join(known_experiments()))
    check_profile(str(cfg.get("profile")), name)
    OmegaConf.resolve(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    device = pick_device(str(cfg.device))
    module = importlib.import_module(f"experiments.{name}")
    check_objective(cfg.get("objective"), module, name)

    command, out_dir, sweep, jobs = _hydra_info()
    load_start = load_average()
    config = OmegaConf.to_container(cfg, resolve=True)
    group = f"{name}-{sweep}" if sweep else name
    logger = make_logger(cfg.logger, group=group, name=f"{name}-seed{cfg.seed}", config=config)
    paths = SimpleNamespace(**{k: Path(v) for k, v in cfg.paths.items()}, out=Path(out_dir))
    ctx = RunContext(device=device, seed=int(cfg.seed), paths=paths,
                     cache=FeatureCache(paths.cache, enabled=bool(cfg.get("cache", True))), log=logger.log)
    start = time.time()
    started = datetime.now(timezone.utc)
    try:
        result = module.run(cfg, ctx)
    except BaseException:
        logger.finish(exit_code=1)
        raise
    duration = time.time() - start
    check_result(result, name)

    record = {
        "experiment": name,
        "profile": cfg.profile,
        "seed": int(cfg.seed),
        "config": config,
        "config_id": config_id(config),
        "rows": result["rows"],
        "curves": result.get("curves", {}),
        "summary": result.get("summary", {}),
        "git_commit": git_commit(paths.root),
        "machine": machine_info(device),
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 3),
        # Timings are clean when nothing else ran: the load may reach the sweep's own threads (threads x jobs)
        "load": {"start": load_start, "end": load_average(), "own_threads": torch.get_num_threads() * jobs},
        "command": command,
        "wandb_group": group if cfg.logger.name != "none" else None,
    }
    stamp = started.strftime("%Y%m%d-%H%M%S")
    path = paths.runs / name / str(cfg.profile) / f"{stamp}-seed{cfg.seed}-{record['config_id']}-{secrets.token_hex(2)}.json"
    atomic_write_json(path, record)
    logger.summary({**result.get("summary", {}), "duration_s": duration})
    logger.finish()
    print(f"[{name}] record written: {path} ({duration:.1f} s)")
    objective = cfg.get("objective")
    if objective:
        if objective not in result.get("summary", {}):
            raise ValueError(f"objective={objective!r} is not among the run's summary keys "
                             f"{sorted(result.get('summary', {}))}")
        return float(result["summary"][objective])
    return None


GENERAL_PROFILES = ("quick", "smoke", "paper")  # every experiment has them (its own file may add settings)


def check_profile(profile: str, name: str) -> None:
    """Refuse a profile the experiment does not have: quick, smoke and paper are every experiment's (a missing
    configs/profile/<exp>/<profile>.yaml means the overlay's own settings); any other needs its file."""
    if profile not in GENERAL_PROFILES and not (CONFIG_DIR / "profile" / name / f"{profile}.yaml").exists():
        have = sorted({*GENERAL_PROFILES, *(p.stem for p in (CONFIG_DIR / "profile" / name).glob("*.yaml"))})
        raise ValueError(f"profile={profile!r} has no settings for experiment {name!r} "
                         f"(configs/profile/{name}/{profile}.yaml); its profiles: {', '.join(have)}")


def check_objective(objective: str | None, module: Any, name: str) -> None:
    """Refuse an hparams search whose objective the experiment never reports, before it runs.

    An experiment module lists what a search may maximise in ``OBJECTIVES`` (summary keys); one without
    the list is checked after its first run instead.
    """
    known = getattr(module, "OBJECTIVES", None)
    if objective and known is not None and objective not in known:
        raise ValueError(f"objective={objective!r} is not reported by experiment {name!r} "
                         f"(it reports: {', '.join(known) or 'none'}), so a search cannot maximise it")


def check_result(result: Any, name: str) -> None:
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or not result["rows"]:
        raise TypeError(f"experiments.{name}.run must return a dict with a non-empty list 'rows'")
    for row in result["rows"]:
        if not (isinstance(row, dict) and isinstance(row.get("keys"), dict) and isinstance(row.get("metrics"), dict)):
            raise TypeError(f"experiments.{name}: each row needs dicts 'keys' and 'metrics', got {row!r}")
