"""The Double DQN table's figures: learning curves (``draw_curves``) and performance profiles
(``performance_profiles``, Agarwal et al., 2021)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from experiments.core import stats
from experiments.reports.ddqn import BASELINE, grouped, normalised, references, runs_of

PROFILE_REPS = 2_000  # replicates of the bands (rliable's default)


def _profiles(records: list[dict]) -> dict[str, list[dict]]:
    out: dict = {}
    for rec in records:
        out.setdefault(rec.get("profile", "default"), []).append(rec)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "quick", kv[0] != "paper", kv[0])))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_curves(records: list[dict], path: Path) -> None:
    """Evaluation return vs env steps: one row of panels per profile, one panel per env, one line per
    variant: the mean over seeds with a 95% band (Student's t at each evaluation point; n in the legend)."""
    plt = _pyplot()
    profiles = {p: grouped(runs_of(recs)) for p, recs in _profiles(records).items()}
    profiles = {p: g for p, g in profiles.items() if g}
    ncols = max(len(g) for g in profiles.values())
    fig, axes = plt.subplots(len(profiles), ncols, figsize=(4.6 * ncols, 3.6 * len(profiles)), squeeze=False)
    for axrow, (profile, groups) in zip(axes, profiles.items()):
        for ax in axrow[len(groups):]:
            ax.axis("off")
        for ax, (env, variants) in zip(axrow, groups.items()):
            for label, by_seed in variants.items():
                cs = [r.record["curves"]["eval_return"] for r in by_seed.values()]
                n = min(len(c["x"]) for c in cs)
                x, y = np.asarray(cs[0]["x"][:n]), np.array([c["y"][:n] for c in cs], dtype=float)  # (seeds, points)
                line, = ax.plot(x, y.mean(axis=0), label=f"{label}, n={len(y)}")
                if len(y) > 1:
                    bands = [stats.t_interval(col) for col in y.T]
                    ax.fill_between(x, [b.lo for b in bands], [b.hi for b in bands], color=line.get_color(), alpha=0.2)
            run = next(iter(next(iter(variants.values())).values()))
            ax.axhline(float(run.record["rows"][0]["info"]["threshold"]), color="grey", ls="--", lw=0.8)
            ax.set_title(f"{run.record['rows'][0]['info'].get('env_id', env)} ({profile})", fontsize=9)
            ax.set_xlabel("environment steps")
            ax.set_ylabel("evaluation return")
            ax.legend(fontsize=6)
    fig.suptitle("Evaluation return: mean over seeds; band: 95% t-interval of the mean; dashed: the reference score",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130, format="png")
    plt.close(fig)


def performance_profiles(records: list[dict]) -> list[tuple[str, Callable[[Path], None]]]:
    """``ddqn_performance_profile_<profile>.png`` for each profile with normalised runs on several envs."""
    out = []
    for profile, recs in _profiles(records).items():
        per_label = _normalised_by_label(recs)
        if per_label:
            out.append((f"ddqn_performance_profile_{profile}.png",
                        lambda path, p=per_label, name=profile: draw_performance_profile(p, name, path)))
    return out


def _normalised_by_label(recs: list[dict]) -> dict[str, list[np.ndarray]]:
    """{variant: [normalised final scores of its runs, per env]} for variants on every env (at least two
    envs, all normalisable); {} otherwise."""
    groups, refs = grouped(runs_of(recs)), references(recs)
    if len(groups) < 2:
        return {}
    labels = [lb for lb in next(iter(groups.values())) if all(lb in v for v in groups.values())]
    out = {}
    for label in labels:
        per_env = [[normalised(r, refs, "normalised final") for r in groups[e][label].values()] for e in groups]
        if all(v is not None for env in per_env for v in env):
            out[label] = [np.asarray(env, dtype=float) for env in per_env]
    return out


def draw_performance_profile(per_label: dict[str, list[np.ndarray]], profile: str, path: Path) -> None:
    """The fraction of runs (all envs pooled) whose normalised final score exceeds τ, with 95% stratified
    bootstrap bands (rliable), one line per variant."""
    plt = _pyplot()
    from rliable import library as rly

    pooled = np.concatenate([x for tasks in per_label.values() for x in tasks])
    taus = np.linspace(min(-0.25, float(pooled.min())), max(1.25, float(pooled.max())), 101)
    profile_of = lambda *t: rly.score_distributions(np.concatenate(t)[:, None], taus)  # noqa: E731
    with warnings.catch_warnings(), stats.rliable_seed(0):  # arch deprecates the RandomState rliable passes
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates(per_label, profile_of, reps=PROFILE_REPS,
                                               random_state=np.random.RandomState(0))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in sorted(per_label, key=lambda s: (not s.startswith(BASELINE + " ") and s != BASELINE, s)):
        line, = ax.plot(taus, point[label], label=label)
        ax.fill_between(taus, ci[label][0], ci[label][1], color=line.get_color(), alpha=0.2)
    envs = len(next(iter(per_label.values())))
    ax.set_xlabel("normalised final score τ (0 = random policy, 1 = reference)")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_title(f"Performance profile, {envs} envs ({profile}); bands: 95% stratified bootstrap", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130, format="png")
    plt.close(fig)
