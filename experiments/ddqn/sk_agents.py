r"""The agents with an SK term: design 1 (in the Q-function, ``sk``; in the bootstrap target, ``sk_td``, the
study's) and design 2 (in the bootstrap target, ``sk_episodic``).

``sk``: design 1, a TD-residual correction head (``SKQNetwork``):
    Q(s, ·) = Q_θ(s, ·) + SK(ψ(s); X = ψ(s_1..s_S), Y)
ψ(s) = L2-normalised penultimate features of the same network (the online network's for Q_online, the
target network's for Q_target: the target network is a frozen copy of the whole augmented Q-function).
SK is ``sk.sparse_krr``: each query solves a k×k kernel ridge regression on its k nearest support points.
Support states: a uniform sample (without replacement) of S replay transitions, redrawn every
``refresh_interval`` env steps. Targets Y (S × A), set at each refresh to the TD-error residual of the
support transition (s_j, a_j, r_j, s'_j): Y_j = e_{a_j} (y_j − Q_θ(s_j, a_j)), y_j its Double DQN target
(zero for the actions not taken), so that right after a refresh the augmented Q moves toward the bootstrap
target at the support points (all the way as the ridge goes to 0; ridge 1 shrinks the noisy residuals,
where 1e-3 interpolated them and the agent collapsed) and decays to the network's own estimate away from
them. ``targets=fixed``: Y stays until the next refresh; ``targets=learned``: Y is a parameter with the
same start, trained by the TD loss (fresh Adam moments at each refresh).

``sk_episodic``: design 2, an episodic memory of Monte-Carlo returns in the bootstrap target
(``EpisodicQNetwork``), after episodic control (Blundell et al., 2016; Pritzel et al., 2017) and the mixed
Monte-Carlo targets of Bellemare et al. (2016) and Ostrovski et al. (2017):
    y = r + γ (1 − terminated) M(s', a*),   a* = argmax_a Q_θ(s', a) (online),
    M(s, a) = Q_target(s, a) + w · SK(ψ(s, a); X = ψ(s_j, a_j), Y_j = G_j − Q_θ(s_j, a_j))
The online network acts and is trained as in Double DQN; only the target carries the memory.
- Memory: S transitions drawn uniformly from the ``memory_window`` most recent ones whose episode has
  ended (the returns are known), redrawn every ``refresh_interval`` env steps (the target network
  receives it at its next copy).
- G_j: the observed discounted return from s_j (``ReplayBuffer.finish_episode``; an episode cut by the
  time limit is completed with γ^n max_a Q(s_T, a)).
- ψ(s, a) = [ψ(s), 2 e_a]: ψ is unit-norm, so two pairs of the same action are at most 2 apart and pairs
  of different actions at least 2√2: a query's neighbours are memories of its own action.
- Y_j (set at each refresh from the online network) makes M a mixture: at a remembered (s_j, a_j),
  M = (1 − w) Q + w G_j (as the ridge goes to 0), the bootstrapped estimate mixed with what actually
  followed; away from the memory, M = Q_target. w = ``mix``.
Why only in the target: with the memory in the acting Q-function (the first try), the correction existed
only for remembered actions; early returns fell below the network's overestimates, so remembered actions
looked worse and the greedy policy fled to the other one (CartPole returns fell to ~10), and the kernel's
gradients into ψ made one seed diverge.

Cost. The support representations X are computed without gradient by the network whose Q they serve and
cached until that network or the support changes (``CachedSupport``): the TD loss trains the encoder
through the queries ψ(s), not through X (``support_grad=true`` restores design 1's first version, the
support states through the network with gradients at every step, 6× the baseline). Design 1 makes three
SK calls per gradient step (Q(s, a) with gradient, the online argmax and the target's value at s') and one
per greedy action; design 2 one per gradient step (the target's, at the online argmax) and none when
acting. Before the first refresh the SK term is absent.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sk
from experiments.ddqn.agents import Agent, QNetwork, Spaces, at, double_dqn_target, mixed_target, register
from experiments.ddqn.replay import Batch, ReplayBuffer

ACTION_SCALE = 2.0  # ψ(s, a) = [ψ(s), 2 e_a]: see design 2 above


def psi(features: torch.Tensor) -> torch.Tensor:
    """ψ: the SK heads' representation, L2-normalised penultimate features (B, d)."""
    return F.normalize(features, dim=1)


def sk_predict(z: torch.Tensor, x, y: torch.Tensor, head: "SKHead") -> torch.Tensor:
    """``sk.sparse_krr`` with the head's k, kernel, lengthscale and ridge; ``x`` a ``sk.PrecomputedSupport``
    (the cached support, see ``CachedSupport``) or a tensor (``support_grad``)."""
    return sk.sparse_krr(z, x, y, k=head.k, kernel=head.kernel, lengthscale=head.lengthscale, ridge=head.ridge)


class CachedSupport:
    """``sk.PrecomputedSupport`` of the support representations by ``qnet`` (ψ of the support states, then
    ``embed(ψ, *extra)`` if given), computed without gradient and recomputed only when the network or the
    support has changed.

    Every in-place update (optimiser steps, ``load_state_dict``, ``copy_`` of the support) bumps a tensor's
    ``_version``; a moved or copied module has new storage. Both are in the key.

    A frozen network's support (the target network's: unchanged for a whole training burst) also gets its
    N x N distances (``distances=True``), so that its calls gather their local matrices. The online
    network's changes after every gradient step, which queries it twice: forming the distances would cost
    as much as the local matrices of those two calls, so its calls form their own.
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


class SKHead(Agent):
    """What both SK agents share: the head's knobs (``sk.head``), a support set of S observations, the
    lengthscale rule and the ``active`` flag (no SK term before the first refresh)."""

    uses_sk_head = True

    def __init__(self, qnet: QNetwork, spaces: Spaces, support_size: int, k: int, kernel: str, lengthscale,
                 ridge: float, refresh_interval: int):
        super().__init__(qnet, spaces)
        self.k, self.kernel, self.ridge, self.lengthscale_rule = k, kernel, ridge, lengthscale
        self.refresh_interval = refresh_interval
        self.register_buffer("support_obs", torch.zeros(support_size, *spaces.obs_shape, dtype=spaces.obs_dtype))
        self.register_buffer("lengthscale", torch.tensor(1.0))
        self.register_buffer("active", torch.tensor(False))

    def set_lengthscale(self, x: torch.Tensor) -> None:
        """A number, or ``auto`` (``sk.auto_lengthscale`` of the support representations x)."""
        rule = self.lengthscale_rule
        value = sk.auto_lengthscale(x, k=self.k) if rule == "auto" else float(rule)
        self.lengthscale.fill_(float(value))


@register("sk")
class SKQNetwork(SKHead):
    """Design 1: Q(s, ·) = Q_θ(s, ·) + SK(ψ(s); X = ψ(support_obs), Y), Y (S, A) the TD residuals.

    ``support_obs``, Y and the lengthscale are set by ``refresh``. Y is a buffer (``targets=fixed``) or a
    parameter (``targets=learned``)."""

    def __init__(self, qnet: QNetwork, spaces: Spaces, targets: str = "fixed", support_grad: bool = False,
                 **head):
        super().__init__(qnet, spaces, **head)
        if targets not in ("fixed", "learned"):
            raise ValueError(f"exp.agents.sk.targets must be fixed or learned, not {targets!r}")
        self.support_grad = support_grad
        y = torch.zeros(len(self.support_obs), spaces.num_actions)
        if targets == "learned":
            self.targets = nn.Parameter(y)
        else:
            self.register_buffer("targets", y)
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
    def refresh(self, replay: ReplayBuffer, rng: np.random.Generator, target: Agent, gamma: float) -> list:
        """Redraw the support set from the replay buffer; Y = the support transitions' TD residuals (their
        bootstrap targets by this agent minus Q_θ)."""
        size = len(self.support_obs)
        if replay.size < size:
            return []
        b = replay.batch(rng.choice(replay.size, size=size, replace=False), self.support_obs.device)
        residual = self.bootstrap_target(b, target, gamma) - self.qnet(b.obs, b.actions)
        self.support_obs.copy_(b.obs)
        self.targets.zero_().scatter_(1, b.actions[:, None], residual[:, None])
        self.set_lengthscale(self.support(self.support_obs).x)
        self.active.fill_(True)
        return [self.targets] if isinstance(self.targets, nn.Parameter) else []  # new points: fresh Adam moments


@register("sk_td")
class TDMemoryQNetwork(SKQNetwork):
    """Design 1 in the bootstrap target (the study's design 1, at most 2× Double DQN's cost): design 1's
    support set and TD-residual targets Y, read out only by the target network at the online argmax,

        y = r + γ (1 − terminated) [Q_θ⁻(s', a*) + SK(ψ⁻(s'); X = ψ⁻(s_j), Y)_{a*}],  a* = argmax_a Q_θ(s', a),

    so that at a remembered s' the bootstrap value moves to that transition's own bootstrap target (a
    two-step backup, smoothed over neighbours). The online network acts and learns as Double DQN's. One
    SK call per gradient step (B queries against the target's cached support) and none when acting, where
    ``sk`` makes three per gradient step (one with gradient) and one per greedy action (3.4× Double DQN
    per env step). It differs from design 2 in what it remembers (the TD residuals of transitions drawn from
    the whole replay buffer, one output per action, read out in full; design 2: the Monte-Carlo returns of
    recent transitions, mixed in with weight w)."""

    def __init__(self, qnet: QNetwork, spaces: Spaces, **head):
        super().__init__(qnet, spaces, targets="fixed", support_grad=False, **head)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        return self.qnet(obs, actions)  # the online network acts and learns without the memory

    def memory_q(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """Q_θ(s, ·) + SK(ψ(s); X, Y): design 1's augmented Q-function (the target network's bootstrap value)."""
        return super().forward(obs, actions)

    def bootstrap_target(self, batch: Batch, target: Agent, gamma: float) -> torch.Tensor:
        return double_dqn_target(batch.rewards, batch.dones, batch.next_obs, self, target.memory_q, gamma)


@register("sk_episodic")
class EpisodicQNetwork(SKHead):
    """Design 2: the online agent is Q_θ; the target's bootstrap value at (s', a*) is
    M = Q_θ⁻(s', a*) + w SK(ψ(s', a*); X = ψ(s_j, a_j), Y_j = G_j − Q_θ(s_j, a_j)) (``memory_terms``),
    one SK call per gradient step: the B queries ψ(s', a*) against the S memories."""

    def __init__(self, qnet: QNetwork, spaces: Spaces, mix: float, memory_window: int, **head):
        super().__init__(qnet, spaces, **head)
        if not 0.0 < mix < 1.0:
            raise ValueError(f"exp.agents.sk_episodic.mix must be in (0, 1), not {mix}")
        if memory_window < len(self.support_obs):
            raise ValueError(f"exp.agents.sk_episodic.memory_window ({memory_window}) must be at least "
                             f"sk.head.support_size ({len(self.support_obs)})")
        self.window = memory_window
        self.register_buffer("support_actions", torch.zeros(len(self.support_obs), dtype=torch.long))
        self.register_buffer("targets", torch.zeros(len(self.support_obs)))
        self.register_buffer("mix", torch.tensor(float(mix)))
        self.support = CachedSupport(qnet, self.embed)

    def embed(self, psi_s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """ψ(s, a) = [ψ(s), 2 e_a]: (M, d), (M,) → (M, d + A)."""
        return torch.cat([psi_s, ACTION_SCALE * F.one_hot(actions, self.spaces.num_actions).to(psi_s.dtype)], dim=1)

    def support_embedding(self) -> sk.PrecomputedSupport:
        return self.support(self.support_obs, self.support_actions)

    def memory_terms(self, obs: torch.Tensor, actions: torch.Tensor | None = None):
        """(Q_θ(s, a), c(s, a)) with c the memory's readout SK(ψ(s, a); X, Y) (zero before the first
        refresh), for given actions (B,) → (B,), (B,), or every action → (B, A), (B, A) (M = Q + w c)."""
        features = self.qnet.features(obs)
        q = at(self.qnet.head(features), actions)
        if not self.active:
            return q, torch.zeros_like(q)
        psi_s = psi(features)
        if actions is None:  # every action: the B × A pairs (s, a)
            m, a = q.shape
            psi_s, actions = psi_s.repeat_interleave(a, dim=0), torch.arange(a, device=q.device).repeat(m)
        readout = sk_predict(self.embed(psi_s, actions), self.support_embedding(), self.targets, self)
        return q, readout.view(q.shape)

    def bootstrap_target(self, batch: Batch, target: Agent, gamma: float) -> torch.Tensor:
        a_star = self(batch.next_obs).argmax(dim=1)  # the online network: Q_θ, no memory
        q_next, readout = target.memory_terms(batch.next_obs, a_star)
        return mixed_target(batch.rewards, batch.dones, q_next, readout, self.mix, gamma)

    @torch.no_grad()
    def refresh(self, replay: ReplayBuffer, rng: np.random.Generator, target: Agent, gamma: float) -> list:
        """Memory = S of the ``memory_window`` most recent transitions with known returns; Y = G − Q_θ(s, a)
        by the current network."""
        idx = replay.recent_with_returns(len(self.support_obs), self.window, rng)
        if idx is None:
            return []
        b = replay.batch(idx, self.support_obs.device)
        self.support_obs.copy_(b.obs)
        self.support_actions.copy_(b.actions)
        self.targets.copy_(b.returns - self.qnet(b.obs, b.actions))
        self.set_lengthscale(self.support_embedding().x)
        self.active.fill_(True)
        return []
