"""One run: the settings of one agent on one environment (``resolve_settings``), its training, its record
(``run``); and the uniform random policy measured on an environment (``exp.agent=random``), the 0 of every
normalised score."""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from experiments.core.records import load_average
from experiments.ddqn.agents import AGENTS
from experiments.ddqn.checkpoint import Checkpointer
from experiments.ddqn.loop import curve_metrics, evaluate, make_env, train

RANDOM = "random"  # exp.agent=random: the uniform random policy, measured (no training)


def reference_score(env_id: str, threshold) -> float:
    """The env's reference score: ``threshold`` from the config, or (null) gymnasium's ``reward_threshold``."""
    if threshold is not None:
        return float(threshold)
    make_env(env_id).close()  # registers MinAtar's ids
    value = gym.spec(env_id).reward_threshold
    if value is None:
        raise ValueError(f"{env_id} has no reward_threshold in gymnasium's registry: set exp.envs.<env>.threshold")
    return float(value)


def resolve_settings(exp, head) -> dict:
    """One run's settings: the chosen env's hyperparameters (shared by every agent), the learning rate
    (the env's, times the agent's ``lr_scale`` if its entry has one), and the agent's options: its entry
    ``exp.agents.<agent>``, plus the SK head (``sk.head``) for an agent that reads it."""
    if exp.env not in exp.envs:
        raise ValueError(f"exp.env={exp.env!r} is not among exp.envs: {sorted(exp.envs)}")
    if exp.agent not in AGENTS or exp.agent not in exp.agents:
        known = sorted(set(AGENTS) & set(exp.agents))
        raise ValueError(f"exp.agent must be {RANDOM} or one of {', '.join(known)} (a class registered in "
                         f"experiments/ddqn/ and an entry under exp.agents), not {exp.agent!r}")
    env = {k: v for k, v in dict(exp.envs[exp.env]).items() if k not in ("device", "reference")}
    options = dict(exp.agents[exp.agent])
    lr_scale = float(options.pop("lr_scale", 1.0))
    if AGENTS[exp.agent].uses_sk_head:
        options.update(dict(head))
        options["lengthscale"] = "auto" if str(head.lengthscale) == "auto" else float(head.lengthscale)
    return {**env, "hidden": list(env["hidden"]), "learning_rate": float(env["learning_rate"]) * lr_scale,
            "threshold": reference_score(env["env_id"], env["threshold"]), "env": exp.env, "agent": exp.agent,
            "eval_episodes": int(exp.eval_episodes), "eval_epsilon": float(exp.eval_epsilon),
            "eval_seed": int(exp.eval_seed), "options": options}


def _load() -> dict:
    """The 1-minute load average now (NaN where the system keeps none): timings taken while other work
    shared the cores are flagged by the report."""
    reading = load_average()
    return float("nan") if reading is None else float(reading[0])


def run(cfg, ctx) -> dict:
    """Train ``exp.agent`` on ``exp.env`` with ``ctx.seed``; one row, keyed by env and agent (every other
    knob that tells runs apart is found from the configs by the table builder)."""
    exp = cfg.exp
    if exp.agent == RANDOM:
        return random_policy(exp, ctx.seed)
    s = resolve_settings(exp, cfg.sk.head)
    folder = exp.checkpoint_dir or ctx.paths.cache / "ddqn_ckpt"
    checkpoint = Checkpointer(Checkpointer.file_for(folder, s, ctx.seed), int(exp.checkpoint_interval))
    load_start = _load()
    out = train(s, ctx.seed, ctx.device, checkpoint, stop_after_steps=exp.get("stop_after_steps"), log=ctx.log)
    load_end = _load()
    if not exp.keep_checkpoint:
        checkpoint.delete()
    metrics = curve_metrics(out["curve"]["x"], out["curve"]["y"], s["threshold"], s["total_steps"])
    metrics["sec_per_step"] = out["sec_per_step"]
    if out["sec_per_step_second_half"] is not None:
        metrics["sec_per_step_second_half"] = out["sec_per_step_second_half"]
    info = {"env_id": s["env_id"], "total_steps": str(s["total_steps"]), "threshold": str(s["threshold"]),
            "device": ctx.device.type, "resumed_from_step": str(out["resumed_from"])}
    return {"rows": [{"keys": {"env": exp.env, "agent": exp.agent}, "metrics": metrics, "info": info}],
            "curves": {"eval_return": out["curve"]},
            "summary": {**metrics, "episodes": len(out["episode_returns"]), "load_1min_start": load_start,
                        "load_1min_end": load_end}}


def random_policy(exp, seed: int) -> dict:
    """``exp.random_episodes`` episodes of the uniform random policy on ``exp.env``, with the evaluation's
    episode seeds (``exp.eval_seed + 1000 * seed + i``): the row's ``final_return`` and ``curve_mean`` are
    their mean return, the 0 of the normalised scores in the report."""
    if exp.env not in exp.envs:
        raise ValueError(f"exp.env={exp.env!r} is not among exp.envs: {sorted(exp.envs)}")
    env_id = exp.envs[exp.env].env_id
    returns = evaluate(None, env_id, int(exp.random_episodes), int(exp.eval_seed) + 1000 * seed, epsilon=1.0)
    mean = float(np.mean(returns))
    metrics = {"final_return": mean, "curve_mean": mean, "return_std": float(np.std(returns, ddof=1))}
    info = {"env_id": env_id, "episodes": str(len(returns)),
            "threshold": str(reference_score(env_id, exp.envs[exp.env].threshold))}
    return {"rows": [{"keys": {"env": exp.env, "agent": RANDOM}, "metrics": metrics, "info": info}],
            "curves": {}, "summary": metrics}
