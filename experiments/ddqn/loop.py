"""The training loop: one agent, one environment, one seed. It reads top to bottom like CleanRL's ``dqn.py``
(seeding, the environment, the networks, the loop, the target update, evaluation) and never asks which
agent it trains (``agents.Agent`` is the interface).

Scheduling follows Stable-Baselines3, whose tuned RL Zoo settings the config uses: ``train_freq`` env
steps between training bursts of ``gradient_steps`` gradient steps, the target network a hard copy every
``target_update_interval`` env steps, ε annealed linearly over ``exploration_steps``. Loss: Huber on
Q(s, a) − y, Adam, gradient-norm clipping (``td_update``).

Evaluation: every ``eval_interval`` env steps and at the end, ``eval_episodes`` episodes with ε =
``eval_epsilon`` on a separate environment whose episode seeds are the same at every evaluation point (and
for every agent). ``sec_per_step``: wall-clock of acting and learning per env step, the device
synchronised before each reading; evaluation and checkpoint writing excluded; ``sec_per_step_second_half``
the same over the second half of the budget (exploration done, the SK memories filled: the steady state).
"""
from __future__ import annotations

import contextlib
import random
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import experiments.ddqn.sk_agents  # noqa: F401  (registers the SK agents)
from experiments.core.progress import progress_bar
from experiments.ddqn.agents import AGENTS, Agent, QNetwork, Spaces
from experiments.ddqn.checkpoint import Checkpointer, RunInterrupted, RunState
from experiments.ddqn.replay import Batch, ReplayBuffer


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


def make_agent(s: dict, observation_space: gym.Space, num_actions: int) -> Agent:
    """The agent ``s["agent"]`` on a fresh Q-network, with its options ``s["options"]``."""
    qnet = QNetwork(observation_space.shape, num_actions, s["encoder"], list(s["hidden"]))
    obs_dtype = torch.bool if observation_space.dtype == np.bool_ else torch.float32
    return AGENTS[s["agent"]](qnet, Spaces(observation_space.shape, obs_dtype, num_actions), **s["options"])


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    return max(end_e, start_e + (end_e - start_e) * t / duration)


def td_update(agent: Agent, target: Agent, optimizer, batch: Batch, gamma: float, max_grad_norm: float):
    """One gradient step on a replay batch: Huber(Q(s, a) − y), y the agent's bootstrap target."""
    q = agent(batch.obs, batch.actions)
    with torch.no_grad():
        y = agent.bootstrap_target(batch, target, gamma)
    loss = F.smooth_l1_loss(q, y)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
    optimizer.step()
    return loss.detach()


class Stopwatch:
    """Seconds of acting and learning: the device synchronised before each reading (CUDA runs
    asynchronously); time inside ``paused()`` (evaluation, checkpoints) is left out."""

    def __init__(self, device: torch.device, seconds: float = 0.0):
        self.device, self.seconds = device, seconds
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def paused(self):
        self._sync()
        self.seconds += time.perf_counter() - self.start
        yield
        self.start = time.perf_counter()

    def read(self) -> float:
        """Seconds so far (the clock keeps running)."""
        with self.paused():
            pass
        return self.seconds


@torch.no_grad()
def evaluate(agent: Agent, env_id: str, episodes: int, seed: int, epsilon: float) -> list[float]:
    """Returns of ``episodes`` ε-greedy episodes with episode seeds seed, seed + 1, ... (the same at every call)."""
    env, rng, returns = make_env(env_id), np.random.default_rng(seed), []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            action = int(rng.integers(env.action_space.n)) if rng.random() < epsilon else agent.act(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def train(s: dict, seed: int, device: torch.device, checkpoint: Checkpointer | None = None,
          stop_after_steps: int | None = None, log=None) -> dict:
    """Train one agent on one environment; ``s``: the settings of ``experiment.resolve_settings``."""
    random.seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    env = make_env(s["env_id"])
    num_actions = int(env.action_space.n)
    agent = make_agent(s, env.observation_space, num_actions).to(device)
    target = agent.make_target()
    optimizer = torch.optim.Adam(agent.parameters(), lr=s["learning_rate"])
    replay = ReplayBuffer(s["buffer_size"], env.observation_space.shape, env.observation_space.dtype)
    run = RunState(agent, target, optimizer, replay, rng, env, device)
    if checkpoint is not None:
        checkpoint.restore(run)
    start_step, gamma = run.step, s["gamma"]
    bar = progress_bar(s["total_steps"], desc=f"ddqn {s['agent']} {s['env']}", initial=run.step, unit="step")
    clock = Stopwatch(device, run.train_seconds)
    obs, episode_return = None, 0.0  # checkpoints fall on episode ends: every segment starts an episode

    while run.step < s["total_steps"]:
        if obs is None:
            obs, episode_return = reset_env(env, rng), 0.0
            replay.start_episode()
        epsilon = linear_schedule(s["exploration_initial_eps"], s["exploration_final_eps"], s["exploration_steps"],
                                  run.step)
        action = int(rng.integers(num_actions)) if rng.random() < epsilon else agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(obs, action, reward, next_obs, terminated)
        obs, episode_return, run.step = next_obs, episode_return + float(reward), run.step + 1
        step = run.step
        if step == s["total_steps"] // 2:
            run.half_seconds = clock.read()  # the second half's rate: the agents' steady state (cost tables)
        if terminated or truncated:  # the episode's returns, a time-limit cut completed with the agent's value
            run.episode_returns.append(episode_return)
            replay.finish_episode(gamma, bootstrap=0.0 if terminated else agent.value(next_obs))
            obs = None

        if step > s["learning_starts"] and step % s["train_freq"] == 0:
            for _ in range(s["gradient_steps"]):
                td_update(agent, target, optimizer, replay.sample(s["batch_size"], rng, device), gamma,
                          s["max_grad_norm"])

        if agent.refresh_interval and step % agent.refresh_interval == 0:
            for p in agent.refresh(replay, rng, target, gamma):
                optimizer.state.pop(p, None)  # new values for new points: fresh Adam moments

        if step % s["target_update_interval"] == 0:
            target.load_state_dict(agent.state_dict())

        if step % 500 == 0 or step == s["total_steps"]:
            bar.update(step - bar.n)
            bar.set_postfix(episodes=len(run.episode_returns), refresh=False,
                            recent_return=f"{np.mean(run.episode_returns[-10:]):.1f}" if run.episode_returns else "-")

        if step % s["eval_interval"] == 0 or step == s["total_steps"]:
            with clock.paused():
                returns = evaluate(agent, s["env_id"], s["eval_episodes"], s["eval_seed"] + 1000 * seed, s["eval_epsilon"])
                run.curve["x"].append(step)
                run.curve["y"].append(float(np.mean(returns)))
                if log is not None:
                    log({"eval/return": run.curve["y"][-1], "train/epsilon": epsilon, "train/episode_return":
                         run.episode_returns[-1] if run.episode_returns else float("nan")}, step=step)

        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            raise RunInterrupted(f"stop_after_steps={stop_after_steps} reached at step {step}")

        if checkpoint is not None and checkpoint.due(step, obs is None, s["total_steps"]):
            with clock.paused():
                run.train_seconds = clock.seconds
                checkpoint.save(run)

    run.train_seconds = clock.read()
    bar.close()
    env.close()
    second_half = run.step - s["total_steps"] // 2
    return {"curve": run.curve, "episode_returns": run.episode_returns, "steps": run.step, "resumed_from": start_step,
            "sec_per_step": run.train_seconds / max(run.step, 1),
            "sec_per_step_second_half": (run.train_seconds - run.half_seconds) / second_half if second_half > 0 else None,
            "replay_buffer": replay, "agent": agent}


def curve_metrics(steps: list[int], returns: list[float], threshold: float, total_steps: int) -> dict:
    """A run's metrics from its evaluation curve: ``final_return`` (the last point, the end of the budget),
    ``curve_mean`` (the mean over evaluation points: the area under the learning curve, in returns; the
    report normalises it), ``steps_to_threshold`` (the first evaluation step whose return reaches
    ``threshold``; the budget when never reached, with ``reached_threshold`` = 0)."""
    reached = [s for s, r in zip(steps, returns) if r >= threshold]
    return {"final_return": float(returns[-1]),
            "curve_mean": float(np.mean(returns)),
            "steps_to_threshold": int(reached[0]) if reached else int(total_steps),
            "reached_threshold": float(bool(reached))}
