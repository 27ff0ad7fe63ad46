r"""Kernel-augmented Double DQN: does an SK component improve a Double DQN agent?

Three agents, identical except for one SK term (in the Q-function or in its bootstrap target), trained with the same seeds, budgets and
hyperparameters (``configs/exp/ddqn.yaml``, per environment under ``exp.envs``; the SK head's under
``sk.head``):

``exp.agent=ddqn``         Double DQN (van Hasselt, Guez and Silver, 2016). The online network picks the
                           greedy action at the next state, the target network evaluates it:
                               y = r + γ (1 − terminated) Q_target(s', argmax_a Q_online(s', a))
                           (``double_dqn_target``; ``dqn_target`` is the plain DQN target, for comparison).
                           Loss: Huber on Q(s, a) − y, Adam, gradient-norm clipping (``td_update``); the
                           target network is a hard copy every ``target_update_interval`` env steps;
                           ε-greedy exploration, ε annealed linearly over ``exploration_steps``. The
                           structure follows CleanRL's ``dqn.py``; the scheduling (train_freq,
                           gradient_steps, target updates counted in env steps) follows Stable-Baselines3,
                           whose tuned RL Zoo settings the config uses.

``exp.agent=sk``           Design 1, a TD-residual correction head (``SKQNetwork``):
                               Q(s, ·) = Q_θ(s, ·) + SK(ψ(s); X = ψ(s_1..s_S), Y)
                           ψ(s) = L2-normalised penultimate features of the same network (the online
                           network's for Q_online, the target network's for Q_target: the target network
                           is a frozen copy of the whole augmented Q-function). SK is ``sk.sparse_krr``:
                           each query solves a k×k kernel ridge regression on its k nearest support points.
                           - Support states: a uniform sample (without replacement) of S replay
                             transitions, redrawn every ``refresh_interval`` env steps.
                           - Targets Y (S × A), set at each refresh to the TD-error residual of the support
                             transition (s_j, a_j, r_j, s'_j): Y_j = e_{a_j} (y_j − Q_θ(s_j, a_j)), y_j its
                             Double DQN target (zero for the actions not taken), so that right after a
                             refresh the augmented Q moves toward the bootstrap target at the support points
                             (all the way as the ridge goes to 0; the default ridge 1 shrinks the noisy
                             residuals, where 1e-3 interpolated them and the agent collapsed) and decays to
                             the network's own estimate away from them. ``targets=fixed``: Y
                             stays until the next refresh; ``targets=learned``: Y is a parameter with the
                             same start, trained by the TD loss (fresh Adam moments at each refresh).

``exp.agent=sk_episodic``  Design 2, an episodic memory of Monte-Carlo returns in the bootstrap target
                           (``EpisodicQNetwork``), after episodic control (Blundell et al., 2016, Model-Free
                           Episodic Control; Pritzel et al., 2017, Neural Episodic Control) and the mixed
                           Monte-Carlo targets of Bellemare et al. (2016) and Ostrovski et al. (2017):
                               y = r + γ (1 − terminated) M(s', a*),   a* = argmax_a Q_θ(s', a) (online),
                               M(s, a) = Q_target(s, a) + w · SK(ψ(s, a); X = ψ(s_j, a_j), Y_j = G_j − Q_θ(s_j, a_j))
                           The online network acts and is trained as in Double DQN; only the target
                           network carries the memory (``use_memory``).
                           - Memory: S transitions drawn uniformly from the ``memory_window`` most recent
                             ones whose episode has ended (the returns are known), redrawn every
                             ``refresh_interval`` env steps (the target network receives it at its next copy).
                           - G_j: the observed discounted Monte-Carlo return from s_j, G = r + γ G' back
                             from the episode's end; an episode cut by the time limit is completed with
                             γ^n max_a Q(s_T, a) (partial-episode bootstrapping, Pardo et al., 2018).
                           - ψ(s, a) = [ψ(s), 2 e_a]: ψ is unit-norm, so two pairs of the same action are
                             at most 2 apart and pairs of different actions at least 2√2: a query's
                             neighbours are memories of its own action (NEC's one memory per action).
                           - Y_j (set at each refresh from the online network) makes M a mixture: at a
                             remembered (s_j, a_j), M = (1 − w) Q + w G_j (as the ridge goes to 0; the ridge
                             shrinks Y toward 0), the bootstrapped estimate mixed with what actually
                             followed; away from the memory, M = Q_target. w = ``mix``.
                           Why it may help where design 1 did not: design 1's targets are the TD loss's
                           own bootstrap targets, so the head only anticipates what the gradient steps fit
                           anyway; design 2 brings information the TD loss propagates slowly: multi-step
                           returns, one episode after they were observed (reward information travels back
                           a whole episode at once instead of one step per bootstrap), smoothed over
                           neighbouring states by the kernel. Why only in the target: with the memory in
                           the acting Q-function (the first try), the correction exists only for remembered
                           actions; early returns fall below the network's overestimates, so remembered
                           actions looked worse and the greedy policy fled to the other one (CartPole
                           returns fell to ~10, always one action; exploratory, 2 seeds), and the kernel's
                           gradients into ψ made one seed diverge. The first try also kept only the S most
                           recent transitions: one stretch of one trajectory.

Both heads (cost design). The support representations X are computed without gradient, by the network
whose Q they serve, and cached until that network or the support changes (``CachedSupportFeatures``): the
TD loss trains the encoder through the queries ψ(s) and not through X. The first version pushed the S
support states through the network with gradients at every gradient step (a 320-row forward and backward
for a batch of 64) and cost 6× the baseline per env step; ``support_grad=true`` keeps that behaviour for
design 1 (the loss then also moves X). A gradient step makes three SK calls (Q(s, a) with gradient, the
online argmax and the target's value at s', the last two without), an ε-greedy step one (a single query);
the episodic head is queried only by the target network, at the online argmax (one call per gradient step). The neighbours come from
one matmul and a top-k (``sk_predict``). Before the first refresh (fewer than S transitions, or completed
ones) the head is absent. What remains is SK's own cost per call (CartPole, 1 thread: about 1.2 ms for 64
queries against 256 points, of which the k×k solves are microseconds of arithmetic): design 1 costs
3.6× the baseline per env step there (3.9-4.3 vs 1.09-1.16 ms), down from 6.3×; design 2, one SK call per
gradient step and none when acting, 1.6× (1.74 ms).

Evaluation: every ``eval_interval`` env steps, ``eval_episodes`` episodes with ε = ``eval_epsilon``
on a separate environment whose episode seeds are the same at every evaluation point (and for every
agent). Per run: ``final_return`` (mean return at the last evaluation point, the end of the budget),
``auc`` (mean over evaluation points of (R − random_return)/(threshold − random_return): 0 = uniform
random policy, 1 = the threshold all along), ``steps_to_threshold`` (first evaluation step whose mean
return reaches the env's ``threshold``; the budget when never reached, with ``reached_threshold`` = 0),
``sec_per_step`` (wall-clock of acting and learning per env step, the device synchronised before each
reading; evaluation and checkpoint writing excluded). For tables: ``summarize`` (per env and agent: IQM
and mean with 95% bootstrap CIs), ``comparisons`` (normalised scores, aggregates across envs with
stratified bootstrap CIs, paired per-seed differences against Double DQN, cost), ``make_figure``
(learning curves) and ``extra_figures`` (performance profiles); the statistics are rliable's (Agarwal et
al., 2021).

Checkpoints (resume a killed run): at the first episode end after every ``checkpoint_interval`` env steps,
the networks, optimiser, replay buffer, eval curve and RNG states are written atomically, all as CPU
tensors, to ``<folder>/ddqn-<env>-<agent>-seed<seed>-<hash of the settings and seed>.pt`` (folder:
``exp.checkpoint_dir``, or ``<paths.cache>/ddqn_ckpt``), and read back with ``map_location="cpu"`` before
being moved to the run's device: a checkpoint written on the GPU resumes on the CPU and back. Every
episode starts with ``env.reset(seed=...)`` drawn from the run's numpy generator, so saving at an episode
boundary captures the environment's randomness exactly (plus MinAtar's sticky-action memory), and a
resumed run repeats an uninterrupted one step for step on the CPU. A completed run deletes its own
checkpoint file and nothing else (``keep_checkpoint: true`` keeps it).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sk
from experiments.core.atomic import atomic_write
from experiments.core.probes import rliable_seed
from experiments.core.progress import progress_bar

AGENTS = ("ddqn", "sk", "sk_episodic")


# ------------------------------------------------------------------------------------------ targets
# A Q-network maps obs (B, ...) to Q(s, ·) (B, A), or, given actions (B,), to Q(s, a) (B,) (the episodic head
# then evaluates only those actions).
def dqn_target(rewards, dones, next_obs, target, gamma):
    """Mnih et al. (2015): y = r + γ (1 − done) max_a Q_target(s', a). Shapes: (B,), (B,), (B, ...)."""
    return rewards + gamma * (1.0 - dones) * target(next_obs).max(dim=1).values


def double_dqn_target(rewards, dones, next_obs, online, target, gamma):
    """van Hasselt et al. (2016), eq. 4: y = r + γ (1 − done) Q_target(s', argmax_a Q_online(s', a))."""
    return rewards + gamma * (1.0 - dones) * target(next_obs, online(next_obs).argmax(dim=1))


def td_update(agent: nn.Module, target_agent: nn.Module, optimizer, batch, gamma: float, max_grad_norm: float) -> float:
    """One gradient step of Double DQN on a replay batch: the online ``agent`` picks a', ``target_agent`` values it."""
    obs, actions, rewards, next_obs, dones = batch
    q = agent(obs, actions)
    with torch.no_grad():
        y = double_dqn_target(rewards, dones, next_obs, agent, target_agent, gamma)
    loss = F.smooth_l1_loss(q, y)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
    optimizer.step()
    return loss.detach()


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

    def forward(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        return at(self.head(self.features(obs)), actions)


def at(q: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
    """Q(s, ·) (B, A), or Q(s, a) (B,) for given actions."""
    return q if actions is None else q.gather(1, actions[:, None]).squeeze(1)


def psi(features: torch.Tensor) -> torch.Tensor:
    """ψ: the SK heads' representation, L2-normalised penultimate features."""
    return F.normalize(features, dim=1)


def sk_predict(z: torch.Tensor, x, y: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """``sk.sparse_krr`` with the head's k, kernel, lengthscale and ridge; ``x`` a ``sk.PrecomputedSupport``
    (the cached support, see ``CachedSupport``) or a tensor (``support_grad``)."""
    return sk.sparse_krr(z, x, y, k=head.k, kernel=head.kernel, lengthscale=head.lengthscale, ridge=head.ridge)


class CachedSupport:
    """``sk.PrecomputedSupport`` of the support representations by ``qnet`` (ψ of the support states, then
    ``embed(ψ, *extra)`` if given), computed without gradient and recomputed only when the network or the
    support has changed.

    Every in-place update (optimiser steps, ``load_state_dict``, ``copy_`` of the support) bumps a tensor's
    ``_version``; a moved or copied module has new storage. Both are in the key.

    A frozen network's support (the target network's: unchanged for a whole training burst, 128 gradient
    steps on CartPole) also gets its N x N distances (``distances=True``), so that its calls gather their
    local matrices. The online network's changes after every gradient step, which queries it twice: forming
    the distances (a 256 x 256 x 256 float64 matmul) would cost as much as the local matrices of those two
    calls, so its calls form their own.
    """

    def __init__(self, qnet: QNetwork, embed=None):
        self.qnet, self.params = qnet, list(qnet.parameters())  # (a deep copy of the owner copies both alike)
        self.embed = embed
        self.key, self.value = None, None

    def __call__(self, support_obs: torch.Tensor, *extra: torch.Tensor) -> sk.PrecomputedSupport:
        key = tuple((t._version, t.data_ptr()) for t in (support_obs, *extra, *self.params))
        if key != self.key:
            with torch.no_grad():
                x = psi(self.qnet.features(support_obs))
                frozen = not any(p.requires_grad for p in self.params)
                self.value = sk.PrecomputedSupport(self.embed(x, *extra) if self.embed else x, distances=frozen)
            self.key = key
        return self.value


class SKQNetwork(nn.Module):
    """Design 1: Q(s, ·) = Q_θ(s, ·) + SK(ψ(s); X = ψ(support_obs), Y), Y (S, A) the TD residuals.

    ``support_obs``, Y and the lengthscale are set by ``refresh``; until then the SK term is absent.
    Y is a buffer (``learned_targets=False``) or a parameter.
    """

    def __init__(self, qnet: QNetwork, obs_shape, obs_dtype: torch.dtype, num_actions: int, support_size: int,
                 k: int, kernel: str, lengthscale, ridge: float, learned_targets: bool, support_grad: bool = False):
        super().__init__()
        self.qnet, self.k, self.kernel, self.ridge = qnet, k, kernel, ridge
        self.lengthscale_rule, self.support_grad = lengthscale, support_grad
        self.register_buffer("support_obs", torch.zeros(support_size, *obs_shape, dtype=obs_dtype))
        targets = torch.zeros(support_size, num_actions)
        if learned_targets:
            self.targets = nn.Parameter(targets)
        else:
            self.register_buffer("targets", targets)
        self.register_buffer("lengthscale", torch.tensor(1.0))
        self.register_buffer("active", torch.tensor(False))
        self.support = CachedSupport(qnet)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        features = self.qnet.features(obs)
        q = self.qnet.head(features)
        if not self.active:
            return at(q, actions)
        if self.support_grad and torch.is_grad_enabled():
            x = psi(self.qnet.features(self.support_obs))
        else:
            x = self.support(self.support_obs)
        return at(q + sk_predict(psi(features), x, self.targets, self), actions)

    @torch.no_grad()
    def refresh(self, rb: "ReplayBuffer", rng: np.random.Generator, target_agent: "SKQNetwork", gamma: float,
                device) -> bool:
        """Redraw the support set from the replay buffer; Y = the support transitions' TD residuals."""
        size = self.support_obs.shape[0]
        if rb.size < size:
            return False
        obs, actions, rewards, next_obs, dones = rb.batch(rng.choice(rb.size, size=size, replace=False), device)
        residual = double_dqn_target(rewards, dones, next_obs, self, target_agent, gamma) - self.qnet(obs, actions)
        self.support_obs.copy_(obs)
        self.targets.zero_().scatter_(1, actions[:, None], residual[:, None])
        set_lengthscale(self, self.support(self.support_obs).x)
        self.active.fill_(True)
        return True


ACTION_SCALE = 2.0  # ψ(s, a) = [ψ(s), 2 e_a]: see design 2 in the module docstring


class EpisodicQNetwork(nn.Module):
    """Design 2: with ``use_memory`` (the target network), Q_θ(s, a) + w SK(ψ(s, a); X = ψ(s_j, a_j),
    Y_j = G_j − Q_θ(s_j, a_j)); without (the online network), Q_θ(s, a).

    One SK call per forward: the M × A queries ψ(s, a) (M for given actions) against the S memories.
    """

    def __init__(self, qnet: QNetwork, obs_shape, obs_dtype: torch.dtype, num_actions: int, support_size: int,
                 k: int, kernel: str, lengthscale, ridge: float, mix: float, window: int):
        super().__init__()
        if not 0.0 < mix < 1.0:
            raise ValueError(f"sk.head.mix must be in (0, 1), not {mix}")
        if window < support_size:
            raise ValueError(f"sk.head.memory_window ({window}) must be at least sk.head.support_size ({support_size})")
        self.qnet, self.k, self.kernel, self.ridge, self.lengthscale_rule = qnet, k, kernel, ridge, lengthscale
        self.window = window
        self.num_actions = num_actions
        self.register_buffer("support_obs", torch.zeros(support_size, *obs_shape, dtype=obs_dtype))
        self.register_buffer("support_actions", torch.zeros(support_size, dtype=torch.long))
        self.register_buffer("targets", torch.zeros(support_size))
        self.register_buffer("mix", torch.tensor(float(mix)))
        self.use_memory = False  # set on the target network only (train)
        self.register_buffer("lengthscale", torch.tensor(1.0))
        self.register_buffer("active", torch.tensor(False))
        self.support = CachedSupport(qnet, self.embed)

    def embed(self, psi_s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """ψ(s, a) = [ψ(s), 2 e_a]: (M, d), (M,) → (M, d + A)."""
        return torch.cat([psi_s, ACTION_SCALE * F.one_hot(actions, self.num_actions).to(psi_s.dtype)], dim=1)

    def support_embedding(self) -> sk.PrecomputedSupport:
        return self.support(self.support_obs, self.support_actions)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        features = self.qnet.features(obs)
        q = at(self.qnet.head(features), actions)
        if not (self.use_memory and self.active):
            return q
        psi_s = psi(features)
        if actions is None:  # every action: the M × A pairs (s, a)
            m, a = q.shape
            psi_s, actions = psi_s.repeat_interleave(a, dim=0), torch.arange(a, device=q.device).repeat(m)
        correction = sk_predict(self.embed(psi_s, actions), self.support_embedding(), self.targets, self)
        return q + self.mix * correction.view(q.shape)

    @torch.no_grad()
    def refresh(self, rb: "ReplayBuffer", rng, target_agent, gamma, device) -> bool:
        """Memory = S of the ``window`` most recent transitions with known returns; Y = G − Q_θ(s, a) by the
        current network."""
        idx = rb.recent_with_returns(self.support_obs.shape[0], self.window, rng)
        if idx is None:
            return False
        obs, actions = rb.batch(idx, device)[:2]
        returns = torch.as_tensor(rb.returns[idx], device=device)
        self.support_obs.copy_(obs)
        self.support_actions.copy_(actions)
        self.targets.copy_(returns - self.qnet(obs, actions))
        set_lengthscale(self, self.support_embedding().x)
        self.active.fill_(True)
        return True


def set_lengthscale(head: nn.Module, x: torch.Tensor) -> None:
    """The head's lengthscale: a number, or ``auto`` (``sk.auto_lengthscale`` of the support representations)."""
    rule = head.lengthscale_rule
    value = sk.auto_lengthscale(x, k=head.k) if rule == "auto" else float(rule)
    head.lengthscale.fill_(float(value))


# ------------------------------------------------------------------------------------ replay buffer
class ReplayBuffer:
    """Uniform experience replay (a ring of numpy arrays), with the discounted returns of ended episodes.

    ``returns[i]`` is NaN until the episode of transition i has ended and ``finish_episode`` has run.
    """

    FIELDS = ("obs", "next_obs", "actions", "rewards", "dones", "returns")

    def __init__(self, capacity: int, obs_shape, obs_dtype):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.added = self.episode_start = self.returns_known = 0  # counts of transitions ever added
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)  # terminated (not truncated): no bootstrap
        self.returns = np.full(capacity, np.nan, dtype=np.float32)

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.dones[i], self.returns[i] = next_obs, float(terminated), np.nan
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.added += 1

    def finish_episode(self, gamma: float, bootstrap: float = 0.0) -> None:
        """G_t = r_t + γ G_{t+1} back over the episode that just ended, from G_T = ``bootstrap``."""
        g = bootstrap
        for t in range(self.added - 1, max(self.episode_start, self.added - self.size) - 1, -1):
            i = t % self.capacity
            g = float(self.rewards[i]) + gamma * g
            self.returns[i] = g
        self.episode_start = self.returns_known = self.added

    def start_episode(self) -> None:
        self.episode_start = self.added

    def recent_with_returns(self, n: int, window: int, rng: np.random.Generator) -> np.ndarray | None:
        """Ring indices of n transitions drawn uniformly without replacement from the ``window`` most recent
        ones with known returns (all of them if fewer are stored), or None if there are fewer than n."""
        first = max(self.returns_known - window, self.added - self.size)
        if self.returns_known - first < n:
            return None
        return (first + rng.choice(self.returns_known - first, size=n, replace=False)) % self.capacity

    def batch(self, idx, device):
        t = lambda a: torch.as_tensor(a[idx], device=device)  # noqa: E731
        return t(self.obs), t(self.actions), t(self.rewards), t(self.next_obs), t(self.dones)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, "added": self.added, "episode_start": self.episode_start,
                "returns_known": self.returns_known,
                **{f: torch.from_numpy(getattr(self, f)[: self.size].copy()) for f in self.FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        self.added, self.episode_start, self.returns_known = state["added"], state["episode_start"], state["returns_known"]
        for f in self.FIELDS:
            getattr(self, f)[: self.size] = state[f].cpu().numpy()


# ------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def to_cpu(obj):
    """A copy of nested dicts/lists/tuples with every tensor on the CPU (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def checkpoint_file(folder: Path, s: dict, seed: int) -> Path:
    """This run's checkpoint: one file per run, named by env, agent, seed and a hash of every setting
    (not the device: a run resumes on any device), so runs sharing a folder never share a file."""
    digest = hashlib.sha256(json.dumps({"settings": s, "seed": seed}, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"ddqn-{s['env']}-{s['agent']}-seed{seed}-{digest}.pt"


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


def make_agent(s: dict, obs_space, num_actions: int) -> nn.Module:
    qnet = QNetwork(obs_space.shape, num_actions, s["encoder"], list(s["hidden"]))
    if s["agent"] == "ddqn":
        return qnet
    h = s["head"]
    obs_dtype = torch.bool if obs_space.dtype == np.bool_ else torch.float32
    common = dict(obs_shape=obs_space.shape, obs_dtype=obs_dtype, num_actions=num_actions,
                  support_size=h["support_size"], k=h["k"], kernel=h["kernel"], lengthscale=h["lengthscale"],
                  ridge=h["ridge"])
    if s["agent"] == "sk":
        if h["targets"] not in ("fixed", "learned"):
            raise ValueError(f"sk.head.targets must be fixed or learned, not {h['targets']!r}")
        return SKQNetwork(qnet, **common, learned_targets=h["targets"] == "learned", support_grad=h["support_grad"])
    return EpisodicQNetwork(qnet, **common, mix=h["mix"], window=h["memory_window"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait before reading a timer


def train(s: dict, seed: int, device: torch.device, checkpoint_path: Path | None, checkpoint_interval: int,
          stop_after_steps: int | None = None, log=None) -> dict:
    """Train one agent on one environment. ``s``: the settings of ``resolve_settings``."""
    random.seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    env = make_env(s["env_id"])
    num_actions = int(env.action_space.n)
    agent = make_agent(s, env.observation_space, num_actions).to(device)
    target_agent = copy.deepcopy(agent).requires_grad_(False)
    if s["agent"] == "sk_episodic":
        target_agent.use_memory = True  # design 2: the memory enters the bootstrap target only
    optimizer = torch.optim.Adam(agent.parameters(), lr=s["learning_rate"])
    rb = ReplayBuffer(s["buffer_size"], env.observation_space.shape, env.observation_space.dtype)
    episodic = s["agent"] == "sk_episodic"
    refresh_interval = s["head"]["refresh_interval"] if s["head"] else None

    step, curve, episode_returns, train_seconds = 0, {"x": [], "y": []}, [], 0.0
    if checkpoint_path is not None and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        agent.load_state_dict(ckpt["agent"])
        target_agent.load_state_dict(ckpt["target_agent"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
        rb.load_state_dict(ckpt["replay_buffer"])
        rngs = ckpt["rng"]
        random.setstate((rngs["python"][0], tuple(rngs["python"][1]), rngs["python"][2]))
        rng.bit_generator.state = rngs["numpy"]
        torch.set_rng_state(rngs["torch"])
        if device.type == "cuda" and rngs.get("torch_cuda") is not None:
            torch.cuda.set_rng_state(rngs["torch_cuda"], device)
        if _minatar_game(env) is not None:
            _minatar_game(env).last_action = rngs["minatar_last_action"]
        step, curve, episode_returns = ckpt["step"], ckpt["curve"], ckpt["episode_returns"]
        train_seconds = ckpt["train_seconds"]
        print(f"[ddqn] resumed from {checkpoint_path} at step {step}")
    start_step, next_checkpoint = step, (step // checkpoint_interval + 1) * checkpoint_interval
    bar = progress_bar(s["total_steps"], desc=f"ddqn {s['agent']} {s['env']}", initial=step, unit="step")
    _sync(device)
    train_start = time.perf_counter()
    obs, episode_return = None, 0.0  # checkpoints fall on episode ends: every segment starts an episode

    while step < s["total_steps"]:
        if obs is None:
            obs, episode_return = reset_env(env, rng), 0.0
            rb.start_episode()
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
            if episodic:  # a time-limit cut is completed with the agent's own value of the last state
                with torch.no_grad():
                    tail = 0.0 if terminated else float(agent(torch.as_tensor(next_obs, device=device)[None]).max())
                rb.finish_episode(s["gamma"], bootstrap=tail)
            obs = None

        if step > s["learning_starts"] and step % s["train_freq"] == 0:
            for _ in range(s["gradient_steps"]):
                batch = rb.batch(rng.integers(rb.size, size=s["batch_size"]), device)
                td_update(agent, target_agent, optimizer, batch, s["gamma"], s["max_grad_norm"])

        if refresh_interval and step % refresh_interval == 0:
            if agent.refresh(rb, rng, target_agent, s["gamma"], device) and isinstance(agent.targets, nn.Parameter):
                optimizer.state.pop(agent.targets, None)  # new values for new points: fresh Adam moments

        if step % s["target_update_interval"] == 0:
            target_agent.load_state_dict(agent.state_dict())

        if step % 500 == 0 or step == s["total_steps"]:
            bar.update(step - bar.n)
            bar.set_postfix(episodes=len(episode_returns), refresh=False,
                            recent_return=f"{np.mean(episode_returns[-10:]):.1f}" if episode_returns else "-")

        if step % s["eval_interval"] == 0 or step == s["total_steps"]:
            _sync(device)
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
            bar.close()
            raise RunInterrupted(f"stop_after_steps={stop_after_steps} reached at step {step}")

        if checkpoint_path is not None and obs is None and step >= next_checkpoint and step < s["total_steps"]:
            _sync(device)
            train_seconds += time.perf_counter() - train_start
            game = _minatar_game(env)
            save_checkpoint(checkpoint_path, to_cpu({
                "step": step, "curve": curve, "episode_returns": episode_returns, "train_seconds": train_seconds,
                "agent": agent.state_dict(), "target_agent": target_agent.state_dict(),
                "optimizer": optimizer.state_dict(), "replay_buffer": rb.state_dict(),
                "rng": {"python": random.getstate(), "numpy": rng.bit_generator.state,
                        "torch": torch.get_rng_state(),
                        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "minatar_last_action": game.last_action if game is not None else None}}))
            next_checkpoint = (step // checkpoint_interval + 1) * checkpoint_interval
            train_start = time.perf_counter()

    _sync(device)
    train_seconds += time.perf_counter() - train_start
    bar.close()
    env.close()
    return {"curve": curve, "episode_returns": episode_returns, "steps": step, "resumed_from": start_step,
            "sec_per_step": train_seconds / max(step, 1), "replay_buffer": rb, "agent": agent}


# ------------------------------------------------------------------------------------------- the run
HEAD_FIELDS = {"sk": ("support_size", "k", "kernel", "lengthscale", "ridge", "refresh_interval", "targets",
                      "support_grad"),
               "sk_episodic": ("support_size", "k", "kernel", "lengthscale", "ridge", "refresh_interval", "mix",
                               "memory_window")}


def resolve_settings(exp, head) -> dict:
    """One run's settings: the chosen env's hyperparameters (shared by every agent) + the agent's SK head
    (``cfg.sk.head``, the fields that agent reads; None for Double DQN)."""
    if exp.env not in exp.envs:
        raise ValueError(f"exp.env={exp.env!r} is not among exp.envs: {sorted(exp.envs)}")
    if exp.agent not in AGENTS:
        raise ValueError(f"exp.agent must be one of {', '.join(AGENTS)}, not {exp.agent!r}")
    env = {k: v for k, v in dict(exp.envs[exp.env]).items() if k != "device"}
    s = {**env, "hidden": list(env["hidden"]), "env": exp.env, "agent": exp.agent,
         "eval_episodes": int(exp.eval_episodes), "eval_epsilon": float(exp.eval_epsilon), "eval_seed": int(exp.eval_seed),
         "head": None}
    if exp.agent != "ddqn":
        s["head"] = {f: head[f] for f in HEAD_FIELDS[exp.agent]}
        s["head"]["lengthscale"] = "auto" if str(head.lengthscale) == "auto" else float(head.lengthscale)
    return s


def row_keys(s: dict) -> dict:
    h = s["head"] or {}
    return {"env": s["env"], "agent": s["agent"],
            "sk_targets": str(h.get("targets", "-")), "support_size": str(h.get("support_size", "-")),
            "sk_k": str(h.get("k", "-")),
            "sk_mix": str(h.get("mix", "-"))}


def run(cfg, ctx) -> dict:
    exp = cfg.exp
    s = resolve_settings(exp, cfg.sk.head)
    folder = Path(exp.checkpoint_dir) if exp.checkpoint_dir else Path(ctx.paths.cache) / "ddqn_ckpt"
    checkpoint_path = checkpoint_file(folder, s, ctx.seed)
    out = train(s, ctx.seed, ctx.device, checkpoint_path, int(exp.checkpoint_interval),
                stop_after_steps=exp.get("stop_after_steps"), log=ctx.log)
    if not exp.keep_checkpoint:
        checkpoint_path.unlink(missing_ok=True)  # this run's file only: the folder may hold a user's files

    metrics = curve_metrics(out["curve"]["x"], out["curve"]["y"], s["threshold"], s["random_return"], s["total_steps"])
    metrics["sec_per_step"] = out["sec_per_step"]
    info = {"env_id": s["env_id"], "total_steps": str(s["total_steps"]), "threshold": str(s["threshold"]),
            "device": ctx.device.type, "resumed_from_step": str(out["resumed_from"])}
    return {"rows": [{"keys": row_keys(s), "metrics": metrics, "info": info}],
            "curves": {"eval_return": out["curve"]},
            "summary": {**metrics, "episodes": len(out["episode_returns"])}}


# ----------------------------------------------------------------------- tables: statistics (rliable)
BOOTSTRAP_REPS = 10_000  # replicates of every CI in the tables (rliable's default is 50,000; 10,000 keeps a table build to a minute)
PROFILE_REPS = 2_000     # replicates of the performance-profile bands (rliable's default)
VARIANT_KEYS = ("agent", "sk_targets", "support_size", "sk_k", "sk_mix")


def _variant(keys: dict) -> tuple:
    return tuple(keys.get(k, "-") for k in VARIANT_KEYS)


def variant_label(variant: tuple) -> str:
    agent, targets, size, k, mix = variant
    if agent == "ddqn":
        return "ddqn"
    if agent == "sk":
        return f"sk ({targets}, S={size}, k={k})"
    return f"sk_episodic (w={mix}, S={size}, k={k})"


def _scores(records: list[dict]) -> dict:
    """{env: {variant: {seed: row metrics + normalised_final}}} (the newest record of a seed wins)."""
    out: dict = {}
    for rec in sorted(records, key=lambda r: r.get("started_utc", "")):
        for row in rec["rows"]:
            env = row["keys"]["env"]
            ref = rec["config"]["exp"]["envs"][env]
            m = dict(row["metrics"])
            m["normalised_final"] = (m["final_return"] - ref["random_return"]) / (ref["threshold"] - ref["random_return"])
            out.setdefault(env, {}).setdefault(_variant(row["keys"]), {})[rec["seed"]] = m
    return out


def _interval(per_task: list[np.ndarray], statistic) -> tuple[float, float, float]:
    """Point estimate and 95% percentile CI of ``statistic`` over the pooled runs of every task, with
    rliable's stratified bootstrap (runs resampled within each task; tasks may have different run counts)."""
    from rliable import library as rly

    with warnings.catch_warnings(), rliable_seed(0):  # arch deprecates the RandomState rliable passes
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates({"x": [np.asarray(t, dtype=float) for t in per_task]},
                                               lambda *t: np.array([statistic(np.concatenate(t))]),
                                               reps=BOOTSTRAP_REPS, random_state=np.random.RandomState(0))
    return float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0])


def iqm(x: np.ndarray) -> float:
    """Interquartile mean (rliable's ``aggregate_iqm``: the 25%-trimmed mean of all runs)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(x, dtype=float)[:, None]))


def _fmt(est: float, lo: float, hi: float) -> str:
    return f"{est:.3g} [{lo:.3g}, {hi:.3g}]"


def summarize(records: list[dict]) -> list[dict]:
    """Per env and agent variant: IQM and mean over seeds with 95% bootstrap CIs (rliable).

    Columns: env, agent, the SK head's keys, n (seeds), then ``IQM [95% CI]`` and ``mean [95% CI]`` of the
    final return, of the normalised final score ((R − random)/(reference − random)) and of the normalised
    area under the learning curve (``auc``), and the mean time per env step.
    """
    rows = []
    for env, variants in sorted(_scores(records).items()):
        for variant, by_seed in sorted(variants.items(), key=lambda kv: (kv[0][0] != "ddqn", kv[0])):
            runs = list(by_seed.values())
            row = {"env": env, **dict(zip(VARIANT_KEYS, variant)), "n": len(runs)}
            for metric, name in (("final_return", "final return"), ("normalised_final", "normalised final"),
                                 ("auc", "normalised AUC")):
                values = np.array([m[metric] for m in runs])
                row[f"{name}: IQM [95% CI]"] = _fmt(*_interval([values], iqm))
                row[f"{name}: mean [95% CI]"] = _fmt(*_interval([values], np.mean))
            row["ms per step"] = f"{1e3 * np.mean([m['sec_per_step'] for m in runs]):.2f}"
            rows.append(row)
    return rows


def paired_differences(records: list[dict], metric: str = "final_return") -> list[dict]:
    """Per env and SK variant: SK − Double DQN on the same seeds, mean with a 95% bootstrap CI over seeds."""
    rows = []
    for env, variants in sorted(_scores(records).items()):
        base = next((v for k, v in variants.items() if k[0] == "ddqn"), None)
        if base is None:
            continue
        for variant, by_seed in sorted(variants.items()):
            seeds = sorted(set(by_seed) & set(base))
            if variant[0] == "ddqn" or not seeds:
                continue
            d = np.array([by_seed[s][metric] - base[s][metric] for s in seeds])
            est, lo, hi = _interval([d], np.mean)
            rows.append({"env": env, "variant": variant_label(variant), "n": len(seeds), "mean": est, "lo": lo,
                         "hi": hi, "wins": int((d > 0).sum()), "ties": int((d == 0).sum())})
    return rows


def aggregate(records: list[dict], metric: str = "normalised_final") -> list[dict]:
    """Per agent variant present on every env of the records: IQM and mean of a normalised score over all
    runs of all envs, with stratified bootstrap CIs (rliable; strata = envs)."""
    scores = _scores(records)
    envs = sorted(scores)
    variants = set.intersection(*(set(v) for v in scores.values())) if scores else set()
    rows = []
    for variant in sorted(variants, key=lambda v: (v[0] != "ddqn", v)):
        per_env = [np.array([m[metric] for m in scores[e][variant].values()]) for e in envs]
        rows.append({"variant": variant_label(variant), "envs": len(envs), "runs": sum(map(len, per_env)),
                     "iqm": _interval(per_env, iqm), "mean": _interval(per_env, np.mean)})
    return rows


def comparisons(records: list[dict]) -> list[str]:
    """Markdown lines for one profile's records (the table builder's "Comparisons"): the normalisation of
    each env, aggregates across envs, paired differences against Double DQN, and the cost per env step."""
    scores = _scores(records)
    if not scores:
        return []
    lines = ["#### Normalised scores", "",
             "(R − random) / (reference − random): 0 = a uniform random policy (its mean return, measured over "
             "100 episodes), 1 = the reference."]
    for env in sorted(scores):
        ref = next(r for r in records if r["rows"][0]["keys"]["env"] == env)["config"]["exp"]["envs"][env]
        lines.append(f"- {env} ({ref['env_id']}): random = {ref['random_return']:g}, reference = {ref['threshold']:g} "
                     f"({ref.get('reference', 'the env threshold')})")
    if len(scores) > 1:
        lines += ["", "#### Across environments (IQM and mean over all runs of all envs; 95% stratified bootstrap CIs, "
                  f"rliable, {BOOTSTRAP_REPS} replicates)", "",
                  "| agent | envs | runs | normalised final: IQM | mean | normalised AUC: IQM | mean |",
                  "|---|---|---|---|---|---|---|"]
        auc = {r["variant"]: r for r in aggregate(records, "auc")}
        for r in aggregate(records, "normalised_final"):
            a = auc[r["variant"]]
            lines.append(f"| {r['variant']} | {r['envs']} | {r['runs']} | {_fmt(*r['iqm'])} | {_fmt(*r['mean'])} | "
                         f"{_fmt(*a['iqm'])} | {_fmt(*a['mean'])} |")
    for metric, name in (("final_return", "final return"), ("auc", "normalised AUC")):
        diffs = paired_differences(records, metric)
        if diffs:
            lines += ["", f"#### Paired differences, SK − Double DQN, {name} (same seeds; mean with a 95% bootstrap "
                      "CI over seeds; wins: seeds where SK is higher)", "",
                      "| env | agent | n | mean difference [95% CI] | wins | ties |", "|---|---|---|---|---|---|"]
            lines += [f"| {d['env']} | {d['variant']} | {d['n']} | {d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] | "
                      f"{d['wins']} | {d['ties']} |" for d in diffs]
    cost = []
    for env, variants in sorted(scores.items()):
        base = next((v for k, v in variants.items() if k[0] == "ddqn"), None)
        for variant, by_seed in sorted(variants.items(), key=lambda kv: (kv[0][0] != "ddqn", kv[0])):
            t = np.mean([m["sec_per_step"] for m in by_seed.values()])
            ratio = f"{t / np.mean([m['sec_per_step'] for m in base.values()]):.2f}" if base else "–"
            cost.append(f"| {env} | {variant_label(variant)} | {1e3 * t:.2f} | {ratio} |")
    lines += ["", "#### Cost (wall-clock of acting and learning per env step, mean over seeds)", "",
              "| env | agent | ms per step | ratio to ddqn |", "|---|---|---|---|", *cost]
    return lines


# ------------------------------------------------------------------------------------------- figures
def _profiles(records: list[dict]) -> dict:
    out: dict = {}
    for rec in records:
        out.setdefault(rec.get("profile", "default"), []).append(rec)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "quick", kv[0] != "paper", kv[0])))


def make_figure(records: list[dict], path: Path) -> None:
    """Evaluation return vs env steps: one row of panels per profile, one panel per env; mean over seeds
    with a 95% bootstrap band (percentile, 2,000 replicates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = _profiles(records)
    ncols = max(len({row["keys"]["env"] for r in recs for row in r["rows"]}) for recs in profiles.values())
    fig, axes = plt.subplots(len(profiles), ncols, figsize=(4.6 * ncols, 3.6 * len(profiles)), squeeze=False)
    for axrow, (profile, recs) in zip(axes, profiles.items()):
        curves: dict = {}
        for rec in recs:
            keys = rec["rows"][0]["keys"]
            curves.setdefault(keys["env"], {}).setdefault(_variant(keys), []).append(rec)
        for ax in axrow[len(curves):]:
            ax.axis("off")
        for ax, (env, variants) in zip(axrow, sorted(curves.items())):
            for variant, runs in sorted(variants.items(), key=lambda kv: (kv[0][0] != "ddqn", kv[0])):
                cs = [r["curves"]["eval_return"] for r in runs]
                n = min(len(c["x"]) for c in cs)
                x = np.asarray(cs[0]["x"][:n])
                y = np.array([c["y"][:n] for c in cs], dtype=float)  # (seeds, points)
                boot = y[np.random.default_rng(0).integers(len(y), size=(2000, len(y)))].mean(axis=1)
                lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
                line, = ax.plot(x, y.mean(axis=0), label=f"{variant_label(variant)}, n={len(y)}")
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            ref = runs[0]["config"]["exp"]["envs"][env]
            ax.axhline(ref["threshold"], color="grey", ls="--", lw=0.8)
            ax.set_title(f"{ref['env_id']} ({profile})", fontsize=9)
            ax.set_xlabel("environment steps")
            ax.set_ylabel("evaluation return")
            ax.legend(fontsize=6)
    fig.suptitle("Evaluation return: mean over seeds; band: 95% bootstrap CI of the mean; dashed: the reference "
                 "score", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def extra_figures(records: list[dict]) -> list[tuple[str, Callable[[Path], None]]]:
    """Performance profiles (Agarwal et al., 2021), one figure per profile with records on several envs,
    ``ddqn_performance_profile_<profile>.png`` (the table builder writes them beside the table): the
    fraction of runs (all envs pooled) whose normalised final score exceeds τ, with 95% stratified
    bootstrap bands (rliable)."""
    out = []
    for profile, recs in _profiles(records).items():
        if len(_scores(recs)) >= 2:
            out.append((f"ddqn_performance_profile_{profile}.png",
                        lambda path, recs=recs, profile=profile: draw_performance_profile(recs, profile, path)))
    return out


def draw_performance_profile(recs: list[dict], profile: str, path: Path) -> None:
    """The performance profile of one profile's records (see ``extra_figures``), as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly

    scores = _scores(recs)
    variants = set.intersection(*(set(v) for v in scores.values()))
    per_variant = {variant_label(v): [np.array([m["normalised_final"] for m in scores[e][v].values()])
                                      for e in sorted(scores)] for v in variants}
    taus = np.linspace(min(-0.25, min(float(x.min()) for t in per_variant.values() for x in t)),
                       max(1.25, max(float(x.max()) for t in per_variant.values() for x in t)), 101)
    profile_of = lambda *t: rly.score_distributions(np.concatenate(t)[:, None], taus)  # noqa: E731
    with warnings.catch_warnings(), rliable_seed(0):
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates(per_variant, profile_of, reps=PROFILE_REPS,
                                               random_state=np.random.RandomState(0))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in sorted(per_variant, key=lambda s: (s != "ddqn", s)):
        line, = ax.plot(taus, point[label], label=label)
        ax.fill_between(taus, ci[label][0], ci[label][1], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("normalised final score τ (0 = random policy, 1 = reference)")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_title(f"Performance profile, {len(scores)} envs ({profile}); bands: 95% stratified bootstrap", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130, format="png")
    plt.close(fig)
