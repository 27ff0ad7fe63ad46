r"""Kernel-augmented Double DQN: does an SK component improve a Double DQN agent?

Agents trained with the same seeds, budgets and hyperparameters (``configs/exp/ddqn.yaml``: per
environment under ``exp.envs``, each agent's own knobs under ``exp.agents.<name>``, the SK head's under
``sk.head``), identical but for one term:

``exp.agent=ddqn``         Double DQN (van Hasselt, Guez and Silver, 2016):
                               y = r + γ (1 − terminated) Q_target(s', argmax_a Q_online(s', a))
                           (``agents.double_dqn_target``; ``agents.dqn_target`` is plain DQN's).
``exp.agent=ddqn_mc``      the control: Double DQN mixing each ended transition's own observed return into
                           its target with design 2's weight, and no kernel (``agents.DoubleDQNMC``).
``exp.agent=sk_td``        design 1 as the study runs it: a memory of TD residuals, read out by SK, in the
                           bootstrap target (``sk_agents.TDMemoryQNetwork``; at most 2× Double DQN's cost).
``exp.agent=sk``           design 1 as first built, a TD-residual SK correction head in the Q-function
                           (``sk_agents.SKQNetwork``; 3.4× Double DQN per env step, not in the study).
``exp.agent=sk_episodic``  design 2, an episodic memory of Monte-Carlo returns, read out by SK, in the
                           bootstrap target (``sk_agents``).
``exp.agent=random``       the uniform random policy, measured over ``exp.random_episodes`` episodes (the
                           0 of the normalised scores; no training).

Where things are:

- ``agents.py``      the agent interface (``Agent``: acting, bootstrap target, target copy, refresh, extra
                     state), the Q-network, the targets, Double DQN and its control; ``register``.
- ``sk_agents.py``   the SK designs.
- ``study.py``       the study's protocol: what each agent tunes, where, on which seeds; the selection rule.
- ``replay.py``      the replay buffer (with the returns of ended episodes).
- ``checkpoint.py``  one run's state and its checkpoint file (save, restore, delete).
- ``loop.py``        the training loop, the TD update, evaluation.
- ``experiment.py``  one run's settings and record (``run``), the random policy.

Per run (``run``): ``final_return`` (mean return at the last evaluation point, the end of the budget),
``curve_mean`` (mean over evaluation points: the area under the learning curve), ``steps_to_threshold``
and ``reached_threshold`` (the env's reference score, gymnasium's ``reward_threshold`` unless the config
sets one), ``sec_per_step``, and the 1-minute load average at the start and end of the run. The tables,
normalised scores, statistics and figures are ``experiments/reports/ddqn.py``'s.
"""
from experiments.ddqn.agents import AGENTS, Agent, DoubleDQN, DoubleDQNMC, QNetwork, Spaces, at, dqn_target, \
    double_dqn_target, mixed_target, register
from experiments.ddqn.checkpoint import Checkpointer, RunInterrupted, RunState
from experiments.ddqn.experiment import RANDOM, random_policy, resolve_settings, run
from experiments.ddqn.loop import curve_metrics, evaluate, make_agent, td_update, train
from experiments.ddqn.replay import Batch, ReplayBuffer
from experiments.ddqn.sk_agents import EpisodicQNetwork, SKQNetwork, TDMemoryQNetwork, psi

__all__ = ["AGENTS", "Agent", "Batch", "Checkpointer", "DoubleDQN", "DoubleDQNMC", "EpisodicQNetwork", "QNetwork",
           "RANDOM", "ReplayBuffer", "RunInterrupted", "RunState", "SKQNetwork", "Spaces", "TDMemoryQNetwork", "at", "curve_metrics",
           "dqn_target", "double_dqn_target", "evaluate", "make_agent", "mixed_target", "psi", "random_policy",
           "register", "resolve_settings", "run", "td_update", "train"]
