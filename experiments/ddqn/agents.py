r"""The agent interface, the Q-network, the bootstrap targets, and the agents without a kernel.

An agent (``Agent``) is a Q-function with four duties towards the training loop (``loop.train``), and
nothing else: the loop never asks which agent it trains.

=====================  ==================================================================================
``forward(obs, a)``    Q(s, ·) (B, A) for observations (B, ...), or Q(s, a) (B,) given actions (B,).
``act(obs)``           the greedy action for one observation (ε-greedy exploration is the loop's).
``bootstrap_target``   y (B,) for a replay ``Batch`` and the frozen target agent; the loss is
                       Huber(Q(s, a) − y). Default: the Double DQN target.
``make_target()``      the frozen copy that evaluates the bootstrap target; the loop refreshes it with
                       ``target.load_state_dict(agent.state_dict())`` every ``target_update_interval`` steps.
``refresh(...)``       every ``refresh_interval`` env steps (None: never), the agent may redraw what it
                       keeps beside its network (an SK support set, a memory) from the replay buffer; it
                       returns the parameters whose values it replaced, whose optimiser moments the loop
                       then resets.
extra state            anything a checkpoint must keep beyond parameters and buffers: PyTorch's
                       ``get_extra_state`` / ``set_extra_state`` (it travels in ``state_dict``, hence in
                       every checkpoint and target copy). No agent here needs it: their state is in
                       buffers.
=====================  ==================================================================================

An agent is registered by name with ``@register("name")``; its constructor takes the Q-network, the
environment's ``Spaces`` and the keyword options of its config entry ``exp.agents.<name>`` (plus
``sk.head`` when the class sets ``uses_sk_head``). Adding an agent = one class here (or in
``sk_agents.py``) and one entry under ``exp.agents`` in ``configs/exp/ddqn.yaml``.
"""
from __future__ import annotations

import copy
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from experiments.ddqn.replay import Batch, ReplayBuffer


# ------------------------------------------------------------------------------------------ targets
# A Q-function maps obs (B, ...) to Q(s, ·) (B, A), or, given actions (B,), to Q(s, a) (B,).
def dqn_target(rewards, dones, next_obs, target, gamma):
    """Mnih et al. (2015): y = r + γ (1 − done) max_a Q_target(s', a). Shapes: (B,), (B,), (B, ...)."""
    return rewards + gamma * (1.0 - dones) * target(next_obs).max(dim=1).values


def double_dqn_target(rewards, dones, next_obs, online, target, gamma):
    """van Hasselt et al. (2016), eq. 4: y = r + γ (1 − done) Q_target(s', argmax_a Q_online(s', a))."""
    return rewards + gamma * (1.0 - dones) * target(next_obs, online(next_obs).argmax(dim=1))


def mixed_target(rewards, dones, q_next, readout, mix, gamma):
    """y = r + γ (1 − done) (Q_target(s', a*) + w c): a bootstrap value at (s', a*) corrected by w times a
    readout c (B,) of observed returns. Design 2's c is its memory's SK readout; its control's is
    G' − Q_target(s', a*), the transition's own observed return from s' (``DoubleDQNMC``)."""
    return rewards + gamma * (1.0 - dones) * (q_next + mix * readout)


# ----------------------------------------------------------------------------------------- networks
def at(q: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
    """Q(s, ·) (B, A), or Q(s, a) (B,) for given actions."""
    return q if actions is None else q.gather(1, actions[:, None]).squeeze(1)


class Spaces(NamedTuple):
    """What an agent needs to know of its environment: observation shape and dtype, number of actions."""

    obs_shape: tuple
    obs_dtype: torch.dtype
    num_actions: int


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


# ------------------------------------------------------------------------------------ the interface
AGENTS: dict[str, type["Agent"]] = {}


def register(name: str):
    """Class decorator: make an ``Agent`` subclass available as ``exp.agent=<name>``."""
    def add(cls):
        if name in AGENTS:
            raise ValueError(f"agent {name!r} is registered twice ({AGENTS[name].__name__}, {cls.__name__})")
        cls.name = name
        AGENTS[name] = cls
        return cls
    return add


class Agent(nn.Module):
    """The interface between an agent and the training loop (see the module docstring); its defaults
    are Double DQN's."""

    name: ClassVar[str]
    uses_sk_head: ClassVar[bool] = False  # reads sk.head (the SK agents); others never see it
    refresh_interval: int | None = None

    def __init__(self, qnet: QNetwork, spaces: Spaces):
        super().__init__()
        self.qnet, self.spaces = qnet, spaces

    def forward(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        return self.qnet(obs, actions)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> int:
        """argmax_a Q(s, a) for one observation (numpy, unbatched)."""
        return int(self(self._batch_of_one(obs)).argmax(dim=1).item())

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> float:
        """max_a Q(s, a) for one observation: the tail of an episode cut by the time limit."""
        return float(self(self._batch_of_one(obs)).max())

    def _batch_of_one(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(obs, device=self.qnet.head.weight.device)[None]

    def bootstrap_target(self, batch: Batch, target: "Agent", gamma: float) -> torch.Tensor:
        """y (B,): the Double DQN target, the online agent (self) choosing a', the target agent valuing it."""
        return double_dqn_target(batch.rewards, batch.dones, batch.next_obs, self, target, gamma)

    def make_target(self) -> "Agent":
        """A frozen copy (no gradients) that evaluates the bootstrap target."""
        return copy.deepcopy(self).requires_grad_(False)

    def refresh(self, replay: ReplayBuffer, rng: np.random.Generator, target: "Agent", gamma: float) -> list:
        """Redraw what the agent keeps beside its network; the parameters whose values were replaced."""
        return []


# -------------------------------------------------------------------------- the agents without SK
@register("ddqn")
class DoubleDQN(Agent):
    """Double DQN (van Hasselt, Guez and Silver, 2016): the interface's defaults, nothing added."""


@register("ddqn_mc")
class DoubleDQNMC(DoubleDQN):
    r"""Double DQN with design 2's Monte-Carlo mixing and no kernel: the control that tells what the
    kernel adds.

    For a sampled transition whose episode has ended (its return G = r + γ G' known), the target mixes
    its own observed return with weight w = ``mix`` (the mixed Monte-Carlo target of Bellemare et al.,
    2016, and Ostrovski et al., 2017):
        y = (1 − w) y_DDQN + w G = r + γ (1 − done) (Q_target(s', a*) + w (G' − Q_target(s', a*))),
    which is design 2's target ``mixed_target`` with the memory's readout at (s', a*) replaced by the
    transition's own G' − Q_target(s', a*) (G' = (G − r)/γ, the return observed from s'). Episodes cut by
    the time limit are completed as design 2's are (``ReplayBuffer.finish_episode``); transitions whose
    episode has not ended keep the Double DQN target. Design 2 mixes, at every sampled s', a kernel
    average of the returns of remembered (recent) neighbours; the control, only the transition's own.
    """

    def __init__(self, qnet: QNetwork, spaces: Spaces, mix: float):
        super().__init__(qnet, spaces)
        if not 0.0 < mix < 1.0:
            raise ValueError(f"exp.agents.ddqn_mc.mix must be in (0, 1), not {mix}")
        self.register_buffer("mix", torch.tensor(float(mix)))

    def bootstrap_target(self, batch: Batch, target: Agent, gamma: float) -> torch.Tensor:
        y = super().bootstrap_target(batch, target, gamma)
        ended = ~torch.isnan(batch.returns)
        return torch.where(ended, (1.0 - self.mix) * y + self.mix * batch.returns.nan_to_num(), y)
