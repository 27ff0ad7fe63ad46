"""The Double DQN study, step by step (the Makefile's ddqn-* targets call it; configs/exp/ddqn.yaml's
``exp.tuning`` says what is tuned, where and on which seeds).

    python scripts/ddqn_study.py random                 # the uniform random policy on every env (the 0 of the scores)
    python scripts/ddqn_study.py tune --env cartpole     # every agent's settings on the tuning seeds (profile tune)
    python scripts/ddqn_study.py select                  # print each agent's choice from the tuning records
    python scripts/ddqn_study.py run --env cartpole --seeds 0-9    # the reported runs, each agent with its choice
    python scripts/ddqn_study.py cost                    # short runs one at a time: clean timings (profile cost)

Every step writes ordinary run records (``experiments/run.py``); ``run`` refuses to start before every
agent's choice is complete, and passes the chosen values on the command line, so that each record's
config and command show them; the report recomputes the choice and checks them. ``--dry-run`` prints the
commands instead of running them.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.core.records import load_records  # noqa: E402
from experiments.ddqn.study import Tuning  # noqa: E402

ENVS = ("cartpole", "acrobot", "lunarlander", "breakout")


def composed_exp(profile: str = "quick") -> dict:
    """``exp`` of the composed ddqn config (the tuning grid, the envs' budgets)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=ddqn", f"profile={profile}"])
    return OmegaConf.to_container(cfg.exp, resolve=True)


def seeds(text: str) -> list[int]:
    """``0-9`` or ``0,1,2`` → a list of seeds."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


def command(profile: str, envs, agent: str, overrides: list[str], run_seeds, jobs: int) -> list[str]:
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    return [sys.executable, str(ROOT / "experiments" / "run.py"), "-m", "+exp=ddqn", f"profile={profile}",
            f"exp.env={','.join(envs)}", f"exp.agent={agent}", *overrides,
            f"seed={','.join(map(str, run_seeds))}", *launcher]


def execute(commands: list[list[str]], dry_run: bool) -> None:
    for cmd in commands:
        print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        if not dry_run:
            subprocess.run(cmd, cwd=ROOT, check=True)


def tune_commands(tuning: Tuning, envs, jobs: int) -> list[list[str]]:
    """One sweep per agent and setting over the tuning envs and seeds (profile ``tuning.profile``)."""
    return [command(tuning.profile, envs, agent, grid.overrides(setting), tuning.seeds, jobs)
            for agent, grid in tuning.grids.items() for setting in grid.settings]


def chosen_overrides(tuning: Tuning, runs_dir: Path) -> dict[str, list[str]]:
    """Each agent's chosen setting as command-line overrides; ValueError when a choice is incomplete."""
    from experiments.reports.ddqn import choose

    records = [r for r in load_records(runs_dir, "ddqn") if r.get("profile") == tuning.profile]
    out, missing = {}, []
    for agent, choice in choose(records, tuning).items():
        if choice.chosen is None:
            missing.append(f"{agent}: " + ("; ".join(choice.missing[:3]) or "no normalisable tuning record")
                           + (f" (+{len(choice.missing) - 3} more)" if len(choice.missing) > 3 else ""))
        else:
            out[agent] = choice.grid.overrides(choice.chosen)
    if missing:
        raise ValueError("the tuning is incomplete, so no agent's setting can be chosen yet (run `make ddqn-tune` "
                         "and `make ddqn-random` first):\n  " + "\n  ".join(missing))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("random", "tune", "select", "run", "cost"))
    ap.add_argument("--env", action="append", choices=ENVS, help="env(s) of this step (default: the step's own)")
    ap.add_argument("--seeds", type=seeds, default=seeds("0-9"), help="reported seeds of `run` (default 0-9)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (cost: always one)")
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "runs", help="where the records are")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    tuning = Tuning.from_config(composed_exp())
    if args.step == "random":
        profiles = ",".join(sorted({"quick", tuning.profile}))
        cmd = command(profiles, args.env or ENVS, "random", [], [0], args.jobs)
        execute([cmd], args.dry_run)
    elif args.step == "tune":
        envs = args.env or tuning.envs
        if set(envs) - set(tuning.envs):
            raise SystemExit(f"tuning runs on {', '.join(tuning.envs)} only (exp.tuning.envs)")
        execute(tune_commands(tuning, envs, args.jobs), args.dry_run)
    elif args.step == "select":
        for agent, overrides in chosen_overrides(tuning, args.runs).items():
            print(f"{agent}: {' '.join(overrides)}")
    elif args.step == "run":
        chosen = chosen_overrides(tuning, args.runs)
        execute([command("quick", args.env or ENVS, agent, overrides, args.seeds, args.jobs)
                 for agent, overrides in chosen.items()], args.dry_run)
    else:
        execute([command("cost", args.env or ENVS, ",".join(tuning.grids), [], [1000], 1)], args.dry_run)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
