"""Kernel-augmented Double DQN (issue 7): does an SK component improve a Double DQN agent?

Two agents, identical except for one term, trained with the same seeds, budgets and hyperparameters
(``configs/exp/ddqn.yaml``, per environment under ``exp.envs``):

``exp.agent=ddqn``  Double DQN (van Hasselt, Guez and Silver, 2016). The online network picks the
                    greedy action at the next state, the target network evaluates it:
                        y = r + γ (1 − terminated) Q_target(s', argmax_a Q_online(s', a))
                    (``double_dqn_target``; ``dqn_target`` is the plain DQN target, for comparison).
                    Loss: Huber on Q(s, a) − y, Adam, gradient-norm clipping; the target network is a
                    hard copy every ``target_update_interval`` env steps; ε-greedy exploration, ε
                    annealed linearly over ``exploration_steps``. The structure follows CleanRL's
                    ``dqn.py``, the scheduling (train_freq, gradient_steps, target updates counted in env
                    steps) follows Stable-Baselines3, whose tuned RL Zoo settings the config uses.

``exp.agent=sk``    The same agent whose Q-function carries an SK correction head:
                        Q(s, ·) = Q_θ(s, ·) + SK(ψ(s); X = ψ(s_1..s_S), Y)
                    ψ(s) = L2-normalised penultimate features of the same network (the online network's
                    for Q_online, the target network's for Q_target: the target network is a frozen copy
                    of the whole augmented Q-function). SK is an ``sk.SKLayer``, the local lazy kernel ridge
                    regression of ``sk.sparse_krr``: each query solves a k×k system on its k nearest
                    support points.
                    - Support states s_1..s_S: a uniform sample (without replacement) of S replay
                      transitions, redrawn every ``sk_refresh_interval`` env steps. Their
                      representations X are recomputed by the current network at every forward pass,
                      so the TD loss also trains the encoder through the kernel (both through ψ(s) and X).
                    - Targets Y (S × A), set at each refresh to the TD-error residual of the support
                      transition (s_j, a_j, r_j, s'_j):
                          Y_j = e_{a_j} (y_j − Q_θ(s_j, a_j)),  y_j = Double DQN target of that transition
                      (zero for the actions not taken), so that right after a refresh the augmented
                      Q-function meets the bootstrap target at the support points (up to the ridge and
                      the locality of the solve), like a kernel-smoothed episodic memory, and decays to
                      the network's own estimate away from them.
                      ``sk_targets=fixed``: Y stays as set until the next refresh (a buffer).
                      ``sk_targets=learned``: Y is an ``nn.Parameter`` with the same initialisation,
                      trained by the TD loss with the network (its Adam moments restart at each refresh).
                    - Before the first refresh (fewer than S transitions stored) the SK term is absent.
                    - Lengthscale: ``sk_lengthscale`` (a number, or ``auto``: ``sk.auto_lengthscale`` on
                      the support representations, recomputed at each refresh); kernel, k and ridge from
                      ``sk_kernel``, ``sk_k``, ``sk_ridge``.
                    Ablations: ``exp.sk_targets=fixed|learned``, ``exp.support_size``, ``exp.sk_k``.

Evaluation: every ``eval_interval`` env steps, ``eval_episodes`` episodes with ε = ``eval_epsilon``
on a separate environment whose episode seeds are the same at every evaluation point (and for both
agents). Per run: ``final_return`` (mean return at the last evaluation point, the end of the budget),
``auc`` (mean over evaluation points of (R − random_return)/(threshold − random_return): 0 = uniform
random policy, 1 = the threshold all along), ``steps_to_threshold`` (first evaluation step whose mean
return reaches the env's ``threshold``; the budget when never reached, with ``reached_threshold`` = 0),
``sec_per_step`` (wall-clock of acting and learning per env step; evaluation and checkpoint writing
excluded). ``summarize`` adds 95% bootstrap CIs over seeds (IQM with rliable's stratified bootstrap,
and the mean); ``make_figure`` draws the learning curves with CI bands.

Checkpoints (resume a killed run): at the first episode end after every ``checkpoint_interval`` env
steps, the networks, optimiser, replay buffer, eval curve and RNG states (python, numpy, torch) are
written atomically to ``<checkpoint_dir>/checkpoint.pt`` (default ``<paths.cache>/ddqn_ckpt/<hash of the
run's settings, seed and device>``). Every episode starts with ``env.reset(seed=...)`` drawn from the
run's numpy generator, so saving at an episode boundary captures the environment's randomness exactly
(plus MinAtar's sticky-action memory), and a resumed run repeats an uninterrupted one step for step on
the CPU. The checkpoint is deleted when the run completes (``keep_checkpoint: true`` keeps it).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sk


# ------------------------------------------------------------------------------------------ targets
def dqn_target(rewards, dones, next_q_target, gamma):
    """Mnih et al. (2015): y = r + γ (1 − done) max_a Q_target(s', a). Shapes: (B,), (B,), (B, A)."""
    return rewards + gamma * (1.0 - dones) * next_q_target.max(dim=1).values


def double_dqn_target(rewards, dones, next_q_online, next_q_target, gamma):
    """van Hasselt et al. (2016), eq. 4: y = r + γ (1 − done) Q_target(s', argmax_a Q_online(s', a))."""
    return rewards + gamma * (1.0 - dones) * next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)


# -------------------------------------------------------------------------------------- environment
def make_env(env_id: str) -> gym.Env:
    if env_id.startswith("MinAtar/") and env_id not in gym.registry:
        import minatar.gym

        minatar.gym.register_envs()
    return gym.make(env_id)


def reset_env(env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Start an episode from a seed drawn from the run's generator (so a checkpoint of that generator
    fixes the environment's randomness too)."""
    obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    return obs


def _minatar_game(env: gym.Env):
    return getattr(env.unwrapped, "game", None)  # MinAtar keeps its sticky-action memory across episodes


# ----------------------------------------------------------------------------------------- networks
class QNetwork(nn.Module):
    """Q_θ(s, ·) = head(φ(s)); φ = ``encoder`` gives the penultimate features.

    ``mlp``: flat observation → Linear/ReLU layers of sizes ``hidden``.
    ``cnn``: MinAtar (10, 10, C) boolean frames → Conv(16, 3×3) → ReLU → Linear(hidden[-1]) → ReLU
    (the network of Young and Tian, 2019).
    """

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, encoder: str, hidden: list[int]):
        super().__init__()
        self.cnn = encoder == "cnn"
        if self.cnn:
            h, w, c = obs_shape
            self.encoder = nn.Sequential(nn.Conv2d(c, 16, 3), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(16 * (h - 2) * (w - 2), hidden[-1]), nn.ReLU())
        elif encoder == "mlp":
            layers, width = [], int(np.prod(obs_shape))
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            self.encoder = nn.Sequential(nn.Flatten(), *layers)
        else:
            raise ValueError(f"encoder must be mlp or cnn, not {encoder!r}")
        self.head = nn.Linear(hidden[-1], num_actions)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float()
        return self.encoder(x.permute(0, 3, 1, 2) if self.cnn else x)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(obs))


class SKQNetwork(nn.Module):
    """Q(s, ·) = Q_θ(s, ·) + SK(ψ(s); X = ψ(support_obs), Y), ψ = L2-normalised features of ``qnet``.

    The SK term is an ``sk.SKLayer`` whose representations are passed per call (the current network's
    features of the support states) and whose targets Y (S, A) are a buffer (fixed) or a parameter
    (learned). ``support_obs`` and Y are set by ``refresh_support``; until then the term is absent.
    """

    def __init__(self, qnet: QNetwork, obs_shape, obs_dtype: torch.dtype, num_actions: int, support_size: int,
                 k: int, kernel: str, ridge: float, learned_targets: bool):
        super().__init__()
        self.qnet = qnet
        self.register_buffer("support_obs", torch.zeros(support_size, *obs_shape, dtype=obs_dtype))
        self.sk = sk.SKLayer(targets=torch.zeros(support_size, num_actions), k=k, kernel=kernel, ridge=ridge,
                             learn_targets=learned_targets)
        self.register_buffer("active", torch.tensor(False))

    @staticmethod
    def psi(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1)

    def cached_support_psi(self) -> torch.Tensor:
        """ψ(support states) without grad, recomputed only when the network or the support set has changed
        (every in-place update, optimiser steps and load_state_dict included, bumps a tensor's _version)."""
        key = (self.support_obs._version, *(p._version for p in self.qnet.parameters()))
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = self.psi(self.qnet.features(self.support_obs)), key
        return self._cache

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.qnet(obs)
        if torch.is_grad_enabled():  # training: one pass for queries and support, gradients reach both
            n = obs.shape[0]
            features = self.qnet.features(torch.cat([obs, self.support_obs]))
            psi = self.psi(features)
            features, psi_obs, psi_support = features[:n], psi[:n], psi[n:]
        else:  # acting, bootstrap targets: the support's features change only when the network does
            features = self.qnet.features(obs)
            psi_obs, psi_support = self.psi(features), self.cached_support_psi()
        return self.qnet.head(features) + self.sk(psi_obs, representations=psi_support)


@torch.no_grad()
def refresh_support(agent: SKQNetwork, target_agent: SKQNetwork, rb: "ReplayBuffer", rng: np.random.Generator,
                    gamma: float, lengthscale, device) -> None:
    """Redraw the support set from the replay buffer and set Y to the support transitions' TD residuals."""
    idx = rng.choice(rb.size, size=agent.support_obs.shape[0], replace=False)
    obs, actions, rewards, next_obs, dones = rb.batch(idx, device)
    y = double_dqn_target(rewards, dones, agent(next_obs), target_agent(next_obs), gamma)
    residual = y - agent.qnet(obs).gather(1, actions[:, None]).squeeze(1)
    agent.support_obs.copy_(obs)
    agent.sk.targets.zero_().scatter_(1, actions[:, None], residual[:, None])
    if lengthscale == "auto":
        lengthscale = sk.auto_lengthscale(agent.psi(agent.qnet.features(obs)), k=agent.sk.k)
    agent.sk.kernel.log_lengthscale.fill_(math.log(float(lengthscale)))
    agent.active.fill_(True)


# ------------------------------------------------------------------------------------ replay buffer
class ReplayBuffer:
    """Uniform experience replay (a ring of numpy arrays)."""

    def __init__(self, capacity: int, obs_shape, obs_dtype):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)  # terminated (not truncated): no bootstrap

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.dones[i] = next_obs, float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def batch(self, idx, device):
        t = lambda a: torch.as_tensor(a[idx], device=device)  # noqa: E731
        return t(self.obs), t(self.actions), t(self.rewards), t(self.next_obs), t(self.dones)

    FIELDS = ("obs", "next_obs", "actions", "rewards", "dones")

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size,
                **{f: torch.from_numpy(getattr(self, f)[: self.size].copy()) for f in self.FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for f in self.FIELDS:
            getattr(self, f)[: self.size] = state[f].numpy()


# ------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def settings_hash(settings: dict, seed: int, device: torch.device) -> str:
    blob = json.dumps({"settings": settings, "seed": seed, "device": device.type}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunInterrupted(RuntimeError):
    """Raised by the ``stop_after_steps`` test hook, as if the run had been killed."""


# -------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(agent: nn.Module, env_id: str, episodes: int, seed: int, epsilon: float, device) -> list[float]:
    """Returns of ``episodes`` ε-greedy episodes with episode seeds seed, seed + 1, ... (the same at every call)."""
    env, rng, returns = make_env(env_id), np.random.default_rng(seed), []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                action = int(agent(torch.as_tensor(obs, device=device)[None]).argmax(dim=1).item())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def curve_metrics(steps: list[int], returns: list[float], threshold: float, random_return: float,
                  total_steps: int) -> dict:
    reached = [s for s, r in zip(steps, returns) if r >= threshold]
    normalised = (np.asarray(returns) - random_return) / (threshold - random_return)
    return {"final_return": float(returns[-1]),
            "auc": float(normalised.mean()),
            "steps_to_threshold": int(reached[0]) if reached else int(total_steps),
            "reached_threshold": float(bool(reached))}


# ------------------------------------------------------------------------------------------ training
def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    return max(end_e, start_e + (end_e - start_e) * t / duration)


def train(s: dict, seed: int, device: torch.device, checkpoint_path: Path | None, checkpoint_interval: int,
          stop_after_steps: int | None = None, log=None) -> dict:
    """Train one agent on one environment. ``s``: the flat settings of ``resolve_settings``."""
    random.seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    env = make_env(s["env_id"])
    obs_space, num_actions = env.observation_space, int(env.action_space.n)
    obs_dtype = torch.bool if obs_space.dtype == np.bool_ else torch.float32
    qnet = QNetwork(obs_space.shape, num_actions, s["encoder"], list(s["hidden"]))
    if s["agent"] == "ddqn":
        agent = qnet
    elif s["agent"] == "sk":
        if s["sk_targets"] not in ("fixed", "learned"):
            raise ValueError(f"exp.sk_targets must be fixed or learned, not {s['sk_targets']!r}")
        agent = SKQNetwork(qnet, obs_space.shape, obs_dtype, num_actions, s["support_size"], s["sk_k"],
                           s["sk_kernel"], s["sk_ridge"], learned_targets=s["sk_targets"] == "learned")
    else:
        raise ValueError(f"exp.agent must be ddqn or sk, not {s['agent']!r}")
    agent = agent.to(device)
    target_agent = copy.deepcopy(agent).requires_grad_(False)
    optimizer = torch.optim.Adam(agent.parameters(), lr=s["learning_rate"])
    rb = ReplayBuffer(s["buffer_size"], obs_space.shape, obs_space.dtype)

    step, curve, episode_returns, train_seconds = 0, {"x": [], "y": []}, [], 0.0
    if checkpoint_path is not None and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=False)
        agent.load_state_dict(ckpt["agent"])
        target_agent.load_state_dict(ckpt["target_agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rb.load_state_dict(ckpt["replay_buffer"])
        random.setstate(ckpt["rng"]["python"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if _minatar_game(env) is not None:
            _minatar_game(env).last_action = ckpt["rng"]["minatar_last_action"]
        step, curve, episode_returns = ckpt["step"], ckpt["curve"], ckpt["episode_returns"]
        train_seconds = ckpt["train_seconds"]
        print(f"[ddqn] resumed from {checkpoint_path} at step {step}")
    start_step, next_checkpoint = step, (step // checkpoint_interval + 1) * checkpoint_interval
    train_start = time.perf_counter()
    obs, episode_return = None, 0.0  # checkpoints fall on episode ends: every segment starts an episode

    while step < s["total_steps"]:
        if obs is None:
            obs, episode_return = reset_env(env, rng), 0.0
        epsilon = linear_schedule(s["exploration_initial_eps"], s["exploration_final_eps"],
                                  s["exploration_steps"], step)
        if rng.random() < epsilon:
            action = int(rng.integers(num_actions))
        else:
            with torch.no_grad():
                action = int(agent(torch.as_tensor(obs, device=device)[None]).argmax(dim=1).item())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(obs, action, reward, next_obs, terminated)
        obs, episode_return, step = next_obs, episode_return + float(reward), step + 1
        if terminated or truncated:
            episode_returns.append(episode_return)
            obs = None

        if step > s["learning_starts"] and step % s["train_freq"] == 0:
            for _ in range(s["gradient_steps"]):
                batch = rb.batch(rng.integers(rb.size, size=s["batch_size"]), device)
                b_obs, b_actions, b_rewards, b_next_obs, b_dones = batch
                q = agent(b_obs)
                with torch.no_grad():
                    next_q_online, next_q_target = agent(b_next_obs), target_agent(b_next_obs)
                td_target = double_dqn_target(b_rewards, b_dones, next_q_online, next_q_target, s["gamma"])
                q_taken = q.gather(1, b_actions[:, None]).squeeze(1)
                loss = F.smooth_l1_loss(q_taken, td_target)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), s["max_grad_norm"])
                optimizer.step()

        if s["agent"] == "sk" and step % s["sk_refresh_interval"] == 0 and rb.size >= s["support_size"]:
            refresh_support(agent, target_agent, rb, rng, s["gamma"], s["sk_lengthscale"], device)
            if s["sk_targets"] == "learned":
                optimizer.state.pop(agent.sk.targets, None)  # new values for new points: fresh Adam moments

        if step % s["target_update_interval"] == 0:
            target_agent.load_state_dict(agent.state_dict())

        if step % s["eval_interval"] == 0 or step == s["total_steps"]:
            train_seconds += time.perf_counter() - train_start
            returns = evaluate(agent, s["env_id"], s["eval_episodes"], s["eval_seed"] + 1000 * seed,
                               s["eval_epsilon"], device)
            curve["x"].append(step)
            curve["y"].append(float(np.mean(returns)))
            if log is not None:
                log({"eval/return": curve["y"][-1], "train/epsilon": epsilon,
                     "train/episode_return": episode_returns[-1] if episode_returns else float("nan")}, step=step)
            train_start = time.perf_counter()

        if stop_after_steps is not None and step >= stop_after_steps:
            raise RunInterrupted(f"stop_after_steps={stop_after_steps} reached at step {step}")

        if checkpoint_path is not None and obs is None and step >= next_checkpoint and step < s["total_steps"]:
            train_seconds += time.perf_counter() - train_start
            game = _minatar_game(env)
            save_checkpoint(checkpoint_path, {
                "step": step, "curve": curve, "episode_returns": episode_returns, "train_seconds": train_seconds,
                "agent": agent.state_dict(), "target_agent": target_agent.state_dict(),
                "optimizer": optimizer.state_dict(), "replay_buffer": rb.state_dict(),
                "rng": {"python": random.getstate(), "numpy": rng.bit_generator.state,
                        "torch": torch.get_rng_state(),
                        "minatar_last_action": game.last_action if game is not None else None}})
            next_checkpoint = (step // checkpoint_interval + 1) * checkpoint_interval
            train_start = time.perf_counter()

    train_seconds += time.perf_counter() - train_start
    env.close()
    return {"curve": curve, "episode_returns": episode_returns, "steps": step, "resumed_from": start_step,
            "sec_per_step": train_seconds / max(step, 1), "replay_buffer": rb}


# ------------------------------------------------------------------------------------------- the run
SK_FIELDS = ("sk_targets", "support_size", "sk_k")


def resolve_settings(exp) -> dict:
    """Flat settings of one run: the chosen env's hyperparameters (shared by both agents) + the agent's."""
    if exp.env not in exp.envs:
        raise ValueError(f"exp.env={exp.env!r} is not among exp.envs: {sorted(exp.envs)}")
    s = {**dict(exp.envs[exp.env]), "env": exp.env, "agent": exp.agent,
         "eval_episodes": exp.eval_episodes, "eval_epsilon": exp.eval_epsilon, "eval_seed": exp.eval_seed}
    s["hidden"] = list(s["hidden"])
    if exp.get("total_steps"):
        s["total_steps"] = int(exp.total_steps)
    if exp.agent == "sk":
        s.update({k: exp[k] for k in (*SK_FIELDS, "sk_kernel", "sk_lengthscale", "sk_ridge", "sk_refresh_interval")})
    return s


def row_keys(s: dict) -> dict:
    return {"env": s["env"], "agent": s["agent"], **{k: str(s[k]) if s["agent"] == "sk" else "-" for k in SK_FIELDS}}


def run(cfg, ctx) -> dict:
    exp = cfg.exp
    s = resolve_settings(exp)
    if exp.checkpoint_dir:
        checkpoint_dir = Path(exp.checkpoint_dir)
    else:
        checkpoint_dir = Path(ctx.paths.cache) / "ddqn_ckpt" / settings_hash(s, ctx.seed, ctx.device)
    checkpoint_path = checkpoint_dir / "checkpoint.pt"
    out = train(s, ctx.seed, ctx.device, checkpoint_path, int(exp.checkpoint_interval),
                stop_after_steps=exp.get("stop_after_steps"), log=ctx.log)
    if not exp.keep_checkpoint:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    metrics = curve_metrics(out["curve"]["x"], out["curve"]["y"], s["threshold"], s["random_return"], s["total_steps"])
    metrics["sec_per_step"] = out["sec_per_step"]
    info = {"env_id": s["env_id"], "total_steps": str(s["total_steps"]),
            "threshold": str(s["threshold"]), "resumed_from_step": str(out["resumed_from"])}
    return {"rows": [{"keys": row_keys(s), "metrics": metrics, "info": info}],
            "curves": {"eval_return": out["curve"]},
            "summary": {**metrics, "episodes": len(out["episode_returns"])}}


# -------------------------------------------------------------------------------- across seeds: CIs
def iqm(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: the mean of the middle half, as scipy.stats.trim_mean(scores, 0.25) (rliable)."""
    scores = np.sort(scores, axis=axis)
    n = scores.shape[axis]
    cut = int(0.25 * n)
    return np.take(scores, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def stratified_bootstrap_ci(scores_by_task: list[np.ndarray], statistic, reps: int = 10_000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float, float]:
    """Point estimate and percentile CI of ``statistic`` over all runs of all tasks (Agarwal et al., 2021).

    Each bootstrap replicate resamples the runs of every task with replacement, separately per task
    (the strata), and applies ``statistic`` to the pooled replicate; with one task this is the
    ordinary bootstrap over seeds. ``statistic`` maps an array (reps, n) to (reps,).
    """
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(scores_by_task)
    replicates = np.concatenate([x[rng.integers(len(x), size=(reps, len(x)))] for x in scores_by_task], axis=1)
    values = statistic(replicates)
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(statistic(pooled[None])[0]), float(lo), float(hi)


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _runs(records: list[dict]) -> dict:
    """{row keys (tuple of items): [(record, row), ...]} for the records of this experiment."""
    groups: dict = {}
    for rec in records:
        for row in rec["rows"]:
            groups.setdefault(tuple(row["keys"].items()), []).append((rec, row))
    return groups


def summarize(records: list[dict]) -> list[dict]:
    """95% bootstrap CIs over seeds: one row per (env, agent variant), and per agent variant across envs.

    Columns: the row keys, ``n_seeds``, then for each metric m of ``final_return`` (raw return),
    ``auc`` and ``normalised_final`` ((final_return − random_return)/(threshold − random_return)):
    ``m_mean`` and ``m_iqm`` (interquartile mean), each with ``_lo``/``_hi`` bounds (percentile
    bootstrap over seeds, 10,000 replicates). Rows with env ``all`` (only when several envs are present)
    pool the runs of every env, the bootstrap stratified by env (rliable); their ``final_return_*`` are
    None (raw returns of different envs do not pool) and ``n_seeds`` is the smallest count of an env.
    """
    metrics = ("final_return", "auc", "normalised_final")
    rows, by_variant = [], {}
    for keys, runs in sorted(_runs(records).items(), key=lambda kv: str(kv[0])):
        keys = dict(keys)
        env_cfg = runs[0][0]["config"]["exp"]["envs"][keys["env"]]
        scores = {m: np.array([r["metrics"][m] for _, r in runs], dtype=float) for m in ("final_return", "auc")}
        scores["normalised_final"] = ((scores["final_return"] - env_cfg["random_return"])
                                      / (env_cfg["threshold"] - env_cfg["random_return"]))
        rows.append({**keys, "n_seeds": len(runs), **_ci_columns({m: [scores[m]] for m in metrics})})
        variant = tuple((k, v) for k, v in keys.items() if k != "env")
        by_variant.setdefault(variant, []).append(scores)
    for variant, per_env in by_variant.items():
        if len(per_env) < 2:
            continue
        row = {"env": "all", **dict(variant), "n_seeds": min(len(s["auc"]) for s in per_env)}
        row.update({f"final_return_{name}{end}": None for name in ("mean", "iqm") for end in ("", "_lo", "_hi")})
        row.update(_ci_columns({m: [s[m] for s in per_env] for m in ("auc", "normalised_final")}))
        rows.append(row)
    return rows


def _ci_columns(scores_by_metric: dict) -> dict:
    out = {}
    for metric, per_task in scores_by_metric.items():
        for name, stat in (("mean", _mean), ("iqm", iqm)):
            est, lo, hi = stratified_bootstrap_ci(per_task, stat)
            out.update({f"{metric}_{name}": est, f"{metric}_{name}_lo": lo, f"{metric}_{name}_hi": hi})
    return out


def make_figure(records: list[dict], path: Path) -> None:
    """Evaluation return vs env steps, one panel per env: mean over seeds with a 95% bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _runs(records)
    envs = sorted({dict(k)["env"] for k in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(max(6.0, 5 * len(envs)), 4.0), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for keys, runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            keys = dict(keys)
            if keys["env"] != env:
                continue
            curves = [rec["curves"]["eval_return"] for rec, _ in runs]
            n = min(len(c["x"]) for c in curves)
            x = np.asarray(curves[0]["x"][:n])
            y = np.array([c["y"][:n] for c in curves], dtype=float)  # (seeds, points)
            rng = np.random.default_rng(0)
            boot = y[rng.integers(len(y), size=(2000, len(y)))].mean(axis=1)
            lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
            label = keys["agent"] if keys["agent"] == "ddqn" else \
                f"sk ({keys['sk_targets']}, S={keys['support_size']}, k={keys['sk_k']})"
            line, = ax.plot(x, y.mean(axis=0), label=f"{label}, n={len(y)}")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        env_cfg = next(runs[0][0] for k, runs in groups.items() if dict(k)["env"] == env)["config"]["exp"]["envs"][env]
        ax.axhline(env_cfg["threshold"], color="grey", ls="--", lw=0.8)
        ax.set_title(env_cfg["env_id"])
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return")
        ax.legend(fontsize=7)
    fig.suptitle("Evaluation return: mean over seeds; band: 95% bootstrap CI of the mean;\n"
                 "dashed: the env's threshold", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
