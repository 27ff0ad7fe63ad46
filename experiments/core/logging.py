"""Experiment tracking: W&B (offline unless asked otherwise) or nothing.

``logger=wandb`` (default) logs offline, with no account; ``logger.mode=online`` syncs live (needs
``WANDB_API_KEY`` or ``wandb login``); ``logger=none`` writes no tracker files at all. Each job opens its
own run and finishes it, so the jobs of a multirun are separate W&B runs gathered in one group.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NullLogger:
    """Does nothing: ``logger=none``."""

    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    def __init__(self, *, mode: str, project: str, entity: str | None, group: str, name: str,
                 config: dict[str, Any], directory: str | Path, tags: list[str] | None = None):
        if mode not in {"offline", "online", "disabled"}:
            raise ValueError(f"logger.mode must be offline, online or disabled, not {mode!r}")
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            raise ValueError("logger.mode=online needs a W&B key: set WANDB_API_KEY or run `wandb login` "
                             "(or keep the default logger.mode=offline)")
        self._run = wandb.init(mode=mode, project=project, entity=entity, group=group, name=name,
                               config=config, dir=str(directory), tags=tags, reinit="finish_previous",
                               settings=wandb.Settings(silent=True, console="off"))
        self.run_dir = Path(self._run.dir).parent if mode != "disabled" else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self._run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


def make_logger(cfg_logger: Any, *, group: str, name: str, config: dict[str, Any]):
    kind = cfg_logger.name
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(mode=cfg_logger.mode, project=cfg_logger.project, entity=cfg_logger.get("entity"),
                           group=group, name=name, config=config, directory=cfg_logger.dir)
    raise ValueError(f"unknown logger {kind!r}: use logger=wandb or logger=none")
