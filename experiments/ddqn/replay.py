"""Uniform experience replay with the discounted returns of ended episodes."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    """A replay sample of B transitions (tensors on the run's device).

    obs, next_obs (B, ...); actions (B,) int64; rewards (B,); dones (B,) 1.0 where the episode terminated
    (not truncated: no bootstrap); returns (B,) the observed discounted return G_t from s_t, NaN while the
    transition's episode has not ended.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    dones: torch.Tensor
    returns: torch.Tensor


class ReplayBuffer:
    """A ring of numpy arrays, sampled uniformly.

    ``returns[i]`` is NaN until the episode of transition i has ended and ``finish_episode`` has run:
    G_t = r_t + γ G_{t+1} back from the episode's end, where an episode cut by the time limit starts from
    a bootstrap value (partial-episode bootstrapping, Pardo et al., 2018).
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

    def start_episode(self) -> None:
        self.episode_start = self.added

    def finish_episode(self, gamma: float, bootstrap: float = 0.0) -> None:
        """G_t = r_t + γ G_{t+1} back over the episode that just ended, from G_T = ``bootstrap``."""
        g = bootstrap
        for t in range(self.added - 1, max(self.episode_start, self.added - self.size) - 1, -1):
            i = t % self.capacity
            g = float(self.rewards[i]) + gamma * g
            self.returns[i] = g
        self.episode_start = self.returns_known = self.added

    def recent_with_returns(self, n: int, window: int, rng: np.random.Generator) -> np.ndarray | None:
        """Ring indices of n transitions drawn uniformly without replacement from the ``window`` most recent
        ones with known returns (all of them if fewer are stored), or None if there are fewer than n."""
        first = max(self.returns_known - window, self.added - self.size)
        if self.returns_known - first < n:
            return None
        return (first + rng.choice(self.returns_known - first, size=n, replace=False)) % self.capacity

    def batch(self, idx, device) -> Batch:
        """The transitions at ring indices ``idx``."""
        t = lambda a: torch.as_tensor(a[idx], device=device)  # noqa: E731
        return Batch(t(self.obs), t(self.actions), t(self.rewards), t(self.next_obs), t(self.dones), t(self.returns))

    def sample(self, batch_size: int, rng: np.random.Generator, device) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        return self.batch(rng.integers(self.size, size=batch_size), device)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, "added": self.added, "episode_start": self.episode_start,
                "returns_known": self.returns_known,
                **{f: torch.from_numpy(getattr(self, f)[: self.size].copy()) for f in self.FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        self.added, self.episode_start, self.returns_known = state["added"], state["episode_start"], state["returns_known"]
        for f in self.FIELDS:
            getattr(self, f)[: self.size] = state[f].cpu().numpy()
