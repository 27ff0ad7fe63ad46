"""Resume a killed run: one run's state (``RunState``) saved and restored by one object (``Checkpointer``).

At the first episode end after every ``interval`` env steps, the networks, optimiser, replay buffer, eval
curve and RNG states are written atomically, all as CPU tensors, to
``<folder>/ddqn-<env>-<agent>-seed<seed>-<hash of the settings and seed>.pt``, and read back with
``map_location="cpu"`` before being moved to the run's device: a checkpoint written on the GPU resumes on
the CPU and back. Every episode starts with ``env.reset(seed=...)`` drawn from the run's numpy generator,
so saving at an episode boundary captures the environment's randomness exactly (plus MinAtar's
sticky-action memory), and a resumed run repeats an uninterrupted one step for step on the CPU. A
completed run deletes its own checkpoint file and nothing else (``delete``).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from experiments.core.atomic import atomic_write
from experiments.ddqn.agents import Agent
from experiments.ddqn.replay import ReplayBuffer


@dataclass
class RunState:
    """Everything a resumed run needs: the learners, the replay buffer, the generators, the environment,
    and the progress so far (env steps, evaluation curve, training episodes' returns, training seconds)."""

    agent: Agent
    target: Agent
    optimizer: torch.optim.Optimizer
    replay: ReplayBuffer
    rng: np.random.Generator
    env: gym.Env
    device: torch.device
    step: int = 0
    curve: dict = field(default_factory=lambda: {"x": [], "y": []})
    episode_returns: list = field(default_factory=list)
    train_seconds: float = 0.0
    half_seconds: float = 0.0  # train_seconds when the run reached half its budget


class RunInterrupted(RuntimeError):
    """Raised by the ``stop_after_steps`` test hook, as if the run had been killed."""


def minatar_game(env: gym.Env):
    return getattr(env.unwrapped, "game", None)  # MinAtar keeps its sticky-action memory across episodes


def to_cpu(obj):
    """A copy of nested dicts/lists/tuples with every tensor on the CPU (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class Checkpointer:
    """One run's checkpoint file: when it is due, what it holds, how it is restored and deleted."""

    def __init__(self, path: Path, interval: int):
        if interval < 1:
            raise ValueError(f"exp.checkpoint_interval must be a positive number of env steps, not {interval}")
        self.path, self.interval = Path(path), int(interval)
        self.next_at = self.interval

    @staticmethod
    def file_for(folder: Path, settings: dict, seed: int) -> Path:
        """One file per run, named by env, agent, seed and a hash of every setting (not the device: a run
        resumes on any device), so runs sharing a folder never share a file."""
        digest = hashlib.sha256(json.dumps({"settings": settings, "seed": seed}, sort_keys=True).encode()).hexdigest()[:16]
        return Path(folder) / f"ddqn-{settings['env']}-{settings['agent']}-seed{seed}-{digest}.pt"

    def due(self, step: int, episode_ended: bool, total_steps: int) -> bool:
        """At the first episode end after every ``interval`` steps, never at the end of the budget."""
        return episode_ended and self.next_at <= step < total_steps

    def save(self, run: RunState) -> None:
        """Write the run's state atomically (a reader never sees half a file)."""
        game = minatar_game(run.env)
        state = to_cpu({
            "step": run.step, "curve": run.curve, "episode_returns": run.episode_returns,
            "train_seconds": run.train_seconds, "half_seconds": run.half_seconds,
            "agent": run.agent.state_dict(), "target_agent": run.target.state_dict(),
            "optimizer": run.optimizer.state_dict(), "replay_buffer": run.replay.state_dict(),
            "rng": {"python": random.getstate(), "numpy": run.rng.bit_generator.state, "torch": torch.get_rng_state(),
                    "torch_cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
                    "minatar_last_action": game.last_action if game is not None else None}})
        with atomic_write(self.path) as tmp:
            torch.save(state, tmp)
        self.next_at = (run.step // self.interval + 1) * self.interval

    def restore(self, run: RunState) -> bool:
        """Load the file into ``run`` if it exists (True), else leave ``run`` as it is (False)."""
        if not self.path.exists():
            return False
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        run.agent.load_state_dict(ckpt["agent"])
        run.target.load_state_dict(ckpt["target_agent"])
        run.optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
        run.replay.load_state_dict(ckpt["replay_buffer"])
        rngs = ckpt["rng"]
        random.setstate((rngs["python"][0], tuple(rngs["python"][1]), rngs["python"][2]))
        run.rng.bit_generator.state = rngs["numpy"]
        torch.set_rng_state(rngs["torch"])
        if run.device.type == "cuda" and rngs.get("torch_cuda") is not None:
            torch.cuda.set_rng_state(rngs["torch_cuda"], run.device)
        if minatar_game(run.env) is not None:
            minatar_game(run.env).last_action = rngs["minatar_last_action"]
        run.step, run.curve, run.episode_returns = ckpt["step"], ckpt["curve"], ckpt["episode_returns"]
        run.train_seconds, run.half_seconds = ckpt["train_seconds"], ckpt["half_seconds"]
        self.next_at = (run.step // self.interval + 1) * self.interval
        print(f"[ddqn] resumed from {self.path} at step {run.step}")
        return True

    def delete(self) -> None:
        """Remove this run's file (and nothing else: the folder may hold a user's files)."""
        self.path.unlink(missing_ok=True)
