r"""The Double DQN table's report: normalised scores, paired differences with computed verdicts, aggregates
across environments with and without each one, the tuning choice, and the cost per env step.

Normalised scores: (R − random) / (reference − random), 0 for the uniform random policy (its mean return,
measured by ``exp.agent=random`` records in the same section; an old record's typed-in
``random_return`` only when there is none, marked as such) and 1 for the env's reference score (the
threshold in the row's info). ``normalised AUC``: the normalised mean return over the evaluation points
(the area under the learning curve); ``normalised final``: at the last point.

Statistics (``experiments.core.stats``): a difference between two agents is paired over seeds (the same
seed, the same evaluation episodes), its interval Student's t with the seed count beside it; a family of
comparisons read together (one table) is Holm-corrected; verdicts ("better", "worse", "not separated")
are ``stats.verdict`` of the corrected interval. Aggregates across environments: the mean over
environments of per-environment means (``stats.stratified_t_interval``), with and without each single
environment; the IQM (rliable's stratified bootstrap) is description only.

A variant's name is its agent plus the knobs that tell its records apart, derived from the configuration
(``experiments.core.tables.derived_keys`` over ``used_config``). Agents: ddqn (Double DQN), ddqn_mc (the
control: Double DQN + Monte-Carlo mixing, no kernel), sk_td (design 1 in the bootstrap target, the study's
design 1), sk (design 1 as first built, in the Q-function), sk_episodic (design 2).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.core import stats
from experiments.core.format import interval_number, number, plural
from experiments.core.records import LOAD_MARGIN, load_records
from experiments.core.tables import ABSENT, derived_keys
from experiments.reports.common import Comparison, claim_line, comparison_line
from experiments.ddqn import AGENTS
from experiments.ddqn.study import RULE, Tuning, select, setting_of, short_path

BASELINE, CONTROL, DESIGN_2, RANDOM = "ddqn", "ddqn_mc", "sk_episodic", "random"
AGENT_ORDER = (BASELINE, CONTROL, "sk_td", "sk", DESIGN_2)
COST_PROFILE = "cost"  # short runs one at a time, for clean timings: its section shows the cost only
# exp keys that never change what a run measures (a checkpoint resumes a run exactly), the protocol around
# the runs (the tuning grid, the random policy's episodes), and the per-env and per-agent entries (of which
# used_config keeps the record's own)
NOT_USED = ("checkpoint_dir", "checkpoint_interval", "keep_checkpoint", "stop_after_steps", "tuning", "random_episodes",
            "agents", "envs")


# ------------------------------------------------------------------------------------------ records
def used_config(config: dict) -> dict:
    """What a record's rows depend on: its own env's entry of ``exp.envs``, its own agent's entry of
    ``exp.agents``, ``sk.head`` only for the SK agents, and none of the checkpoint or protocol keys."""
    exp = config.get("exp") or {}
    env, agent = exp.get("env"), exp.get("agent")
    out = {k: v for k, v in config.items() if k not in ("exp", "sk")}
    out["exp"] = {k: v for k, v in exp.items() if k not in NOT_USED}
    out["exp"]["envs"] = {env: (exp.get("envs") or {}).get(env)}
    if agent in (exp.get("agents") or {}):
        out["exp"]["agents"] = {agent: exp["agents"][agent]}
    if agent in AGENTS and AGENTS[agent].uses_sk_head:
        out["sk"] = {"head": (config.get("sk") or {}).get("head")}
    return out


@dataclass
class Run:
    """One record's row: env, agent, its variant's label, seed, and what the report reads."""

    record: dict
    env: str
    agent: str
    label: str
    seed: int
    final: float
    curve_mean: float
    reached: bool
    sec_per_step: float | None  # over the second half of the run where recorded, else over the whole run


def _agent_rank(agent: str) -> int:
    return AGENT_ORDER.index(agent) if agent in AGENT_ORDER else len(AGENT_ORDER)


def _varying(keys: list[dict], groups: list[tuple]) -> list[dict]:
    """Each record's keys that take two or more values among the records of its group (same env and
    agent): what tells its variant apart. Absent values ("–", or "-" in old records) never name a variant."""
    seen: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for k, g in zip(keys, groups):
        for path, value in k.items():
            seen[g][path].add(str(value))
    return [{p: v for p, v in k.items() if len(seen[g][p]) > 1 and str(v) not in (ABSENT, "-")}
            for k, g in zip(keys, groups)]


def _label(agent: str, keys: dict) -> str:
    parts = [f"{short_path(p)}={v}" for p, v in sorted(keys.items())]
    return agent + (f" ({', '.join(parts)})" if parts else "")


def runs_of(records: list[dict]) -> list[Run]:
    """The agents' runs (not the random policy's), each labelled by the keys that tell its variant apart:
    those derived from the configuration (``derived_keys``) and any stored beyond env and agent."""
    agents = [r for r in records if r["rows"][0]["keys"].get("agent") != RANDOM]
    rows = [r["rows"][0] for r in agents]
    keys = [{**derived, **{k: v for k, v in row["keys"].items() if k not in ("env", "agent")}}
            for derived, row in zip(derived_keys(agents, used_config), rows)]
    keys = _varying(keys, [(row["keys"]["env"], row["keys"]["agent"]) for row in rows])
    out = []
    for rec, row, k in zip(agents, rows, keys):
        m, y = row["metrics"], (rec.get("curves") or {}).get("eval_return", {}).get("y")
        curve_mean = float(np.mean(y)) if y else float(m.get("curve_mean", math.nan))
        out.append(Run(rec, row["keys"]["env"], row["keys"]["agent"], _label(row["keys"]["agent"], k), rec.get("seed"),
                       float(m["final_return"]), curve_mean, bool(m.get("reached_threshold")),
                       m.get("sec_per_step_second_half", m.get("sec_per_step"))))
    return out


def grouped(runs: list[Run]) -> dict[str, dict[str, dict]]:
    """{env: {label: {seed: Run}}}, envs sorted, labels in agent order (the newest record of a seed wins)."""
    out: dict = defaultdict(dict)
    for run in sorted(runs, key=lambda r: r.record.get("started_utc", "")):
        out[run.env].setdefault(run.label, {})[run.seed] = run
    return {env: dict(sorted(v.items(), key=lambda kv: (_agent_rank(next(iter(kv[1].values())).agent), kv[0])))
            for env, v in sorted(out.items())}


@dataclass
class Reference:
    """An env's 0 and 1 of the normalised scores and where each comes from."""

    env_id: str
    random: float | None
    random_source: str
    reference: float
    reference_source: str

    def normalise(self, value: float) -> float | None:
        return None if self.random is None else (value - self.random) / (self.reference - self.random)


def references(records: list[dict]) -> dict[str, Reference]:
    """Per env of the records: the random policy's measured mean return (``random`` records), or an old
    record's typed-in ``random_return``; the reference score from the rows' info."""
    measured: dict[str, list[float]] = defaultdict(list)
    episodes: dict[str, int] = defaultdict(int)
    for rec in records:
        row = rec["rows"][0]
        if row["keys"].get("agent") == RANDOM:
            measured[row["keys"]["env"]].append(float(row["metrics"]["final_return"]))
            episodes[row["keys"]["env"]] += int(row["info"].get("episodes", 0))
    out = {}
    for rec in records:
        row = rec["rows"][0]
        env = row["keys"]["env"]
        if env in out:
            continue
        entry = (rec["config"].get("exp", {}).get("envs") or {}).get(env) or {}
        if measured.get(env):
            random, source = float(np.mean(measured[env])), f"measured: {episodes[env]} episodes of the uniform random policy"
        elif entry.get("random_return") is not None:
            random, source = float(entry["random_return"]), "typed into the record's config (no random-policy record)"
        else:
            random, source = None, "not measured: run `make ddqn-random`"
        out[env] = Reference(row["info"].get("env_id", env), random, source, float(row["info"]["threshold"]),
                             str(entry.get("reference") or "the env's reference score"))
    return out


def normalised(run: Run, refs: dict[str, Reference], metric: str) -> float | None:
    """A run's ``normalised final`` or ``normalised AUC``."""
    return refs[run.env].normalise(run.final if metric == "normalised final" else run.curve_mean)


def values(by_seed: dict, refs: dict[str, Reference], metric: str) -> dict:
    """{seed: value} of one variant's runs: ``final return`` raw, or a normalised score (None if unavailable)."""
    if metric == "final return":
        return {s: r.final for s, r in by_seed.items()}
    out = {s: normalised(r, refs, metric) for s, r in by_seed.items()}
    return out if all(v is not None for v in out.values()) else {}


# ------------------------------------------------------------------------------------- comparisons
def paired(a: dict, b: dict) -> stats.Interval | None:
    """Mean of a − b over the seeds both have, with its Student-t interval (None: no common seed)."""
    seeds, d = stats.paired_differences(a, b)
    return stats.t_interval(d) if seeds else None


def with_verdicts(intervals: list[stats.Interval | None]) -> list[tuple[stats.Interval, str] | None]:
    """Holm-corrected intervals and their verdicts, for a family read together (None entries skipped)."""
    present = [iv for iv in intervals if iv is not None]
    corrected = iter(stats.holm(present))
    return [None if iv is None else (lambda c: (c, stats.verdict(c)))(next(corrected)) for iv in intervals]


def cell(result: tuple[stats.Interval, str] | None, digits: int = 3) -> str:
    if result is None:
        return "–"
    iv, word = result
    return f"{interval_number(iv, digits)} (n={iv.n}) | {word}"


def differences_table(groups: dict, refs: dict[str, Reference], pairs: list[tuple[str, str, str]]) -> list[str]:
    """Rows ``| env | a − b | final return | verdict | normalised AUC | verdict |`` for (env, a, b) label
    pairs, each metric's column Holm-corrected as one family."""
    metrics = ("final return", "normalised AUC")
    columns = [with_verdicts([paired(values(groups[e][a], refs, m), values(groups[e][b], refs, m))
                              if values(groups[e][a], refs, m) and values(groups[e][b], refs, m) else None
                              for e, a, b in pairs]) for m in metrics]
    lines = [f"| env | difference | {metrics[0]}: mean [95% t-interval] (seeds) | verdict | "
             f"{metrics[1]}: mean [95% t-interval] (seeds) | verdict |", "|---|---|---|---|---|---|"]
    for i, (env, a, b) in enumerate(pairs):
        lines.append(f"| {env} | {a} − {b} | {cell(columns[0][i])} | {cell(columns[1][i])} |")
    return lines


def baseline_label(variants: dict) -> str | None:
    """The env's one Double DQN variant, the reference of the paired differences (None: none, or several)."""
    base = [label for label, runs in variants.items() if next(iter(runs.values())).agent == BASELINE]
    return base[0] if len(base) == 1 else None


def against_baseline(groups: dict, refs: dict[str, Reference]) -> list[str]:
    pairs = [(env, label, base) for env, variants in groups.items() if (base := baseline_label(variants))
             for label in variants if label != base]
    if not pairs:
        return []
    return ["", f"#### Every agent − Double DQN ({plural(len(pairs), 'comparison')} per metric, Holm-corrected "
            "together)", "", *differences_table(groups, refs, pairs)]


def _one_label(variants: dict, agent: str) -> str | None:
    labels = [label for label, runs in variants.items() if next(iter(runs.values())).agent == agent]
    return labels[0] if len(labels) == 1 else None


def aggregate_difference(groups: dict, refs: dict[str, Reference], envs: list[str], a: str, b: str,
                         metric: str) -> stats.Interval | None:
    """Mean over ``envs`` of the per-env mean paired difference a − b of a normalised score (agents a, b),
    with the stratified t-interval; None where an env lacks either agent or its normalisation."""
    per_env = []
    for env in envs:
        la, lb = _one_label(groups[env], a), _one_label(groups[env], b)
        va = values(groups[env][la], refs, metric) if la else {}
        vb = values(groups[env][lb], refs, metric) if lb else {}
        seeds, d = stats.paired_differences(va, vb)
        if not seeds:
            return None
        per_env.append(d)
    return stats.stratified_t_interval(per_env) if per_env else None


def headline(groups: dict, refs: dict[str, Reference]) -> list[str]:
    """What the kernel adds: design 2 − the control beside design 2 − Double DQN, per env (Holm across the
    per-env comparisons) and across envs (Holm across the two; each env left out in turn), and the claim."""
    envs = [e for e in groups if _one_label(groups[e], DESIGN_2) and _one_label(groups[e], CONTROL)]
    if not envs:
        return []
    others = [b for b in (CONTROL, BASELINE) if all(_one_label(groups[e], b) for e in envs)]
    pairs = [(e, _one_label(groups[e], DESIGN_2), _one_label(groups[e], b)) for e in envs for b in others]
    lines = ["", "#### What the kernel adds: design 2 − the control (ddqn_mc), beside design 2 − Double DQN", "",
             f"Paired over seeds; {plural(len(pairs), 'comparison')} per metric, Holm-corrected together.", "",
             *differences_table(groups, refs, pairs)]
    if len(envs) < 2:
        return lines
    lines += ["", "Across environments: the mean over environments of the per-environment mean paired difference "
              "of a normalised score (stratified t-interval; n: paired runs); the two comparisons of each metric "
              "Holm-corrected together, each environment left out in turn (uncorrected: a sensitivity check).", "",
              "| environments | difference | normalised final | verdict | normalised AUC | verdict |",
              "|---|---|---|---|---|---|"]
    metrics = ("normalised final", "normalised AUC")
    subsets = [("all " + str(len(envs)), envs)] + [(f"without {e}", [x for x in envs if x != e]) for e in envs]
    claims = []
    for name, subset in subsets:
        per_metric = [[aggregate_difference(groups, refs, subset, DESIGN_2, b, m) for b in others] for m in metrics]
        judged = [with_verdicts(ivs) if name.startswith("all") else
                  [None if iv is None else (iv, stats.verdict(iv)) for iv in ivs] for ivs in per_metric]
        for j, b in enumerate(others):
            lines.append(f"| {name} | {DESIGN_2} − {b} | {cell(judged[0][j])} | {cell(judged[1][j])} |")
        if name.startswith("all"):  # the headline rows: mean normalised final score over every environment
            claims = [Comparison(f"{DESIGN_2} − {b}, normalised final, mean over {len(envs)} environments",
                                 *judged[0][j], family=len(others)) for j, b in enumerate(others) if judged[0][j]]
    if claims:
        lines += [""] + [comparison_line(c, interval_number, "") for c in claims]
        lines.append(claim_line(CLAIM, [c for c in claims if c.name.startswith(f"{DESIGN_2} − {CONTROL}")]))
    return lines


CLAIM = ("an SK readout of an episodic memory in Double DQN's bootstrap target improves the agent beyond what the "
         "Monte-Carlo returns it reads add on their own (the kernel-free control).")


# -------------------------------------------------------------------------------------- aggregates
BOOTSTRAP_REPS = 2_000  # replicates of the IQMs' stratified bootstrap (description only)


def aggregates(groups: dict, refs: dict[str, Reference]) -> list[str]:
    """Per variant present on every env: the mean over envs of its mean normalised scores (stratified
    t-interval), the IQM of all its runs (stratified bootstrap, description), and the mean without each env."""
    envs = list(groups)
    labels = [label for label in next(iter(groups.values())) if all(label in groups[e] for e in envs)]
    if len(envs) < 2 or not labels:
        return []
    lines = ["", f"#### Across environments ({len(envs)}): normalised scores", "",
             "Mean over environments of each environment's mean (95% stratified t-interval; n: runs); IQM of all runs "
             f"(rliable's stratified bootstrap, {BOOTSTRAP_REPS} replicates: description only, "
             f"under-covers below {stats.BOOTSTRAP_MIN_N} runs an environment).", "",
             "| agent | runs | normalised final: mean | IQM | normalised AUC: mean | IQM |", "|---|---|---|---|---|---|"]
    leave_out = ["", "The same means without each environment (a lead carried by one environment shows here):", "",
                 "| agent | metric | all | " + " | ".join(f"without {e}" for e in envs) + " |",
                 "|---|---|---|" + "---|" * len(envs)]
    for label in labels:
        cells = []
        for metric in ("normalised final", "normalised AUC"):
            per_env = [list(values(groups[e][label], refs, metric).values()) for e in envs]
            if not all(per_env):
                cells += ["–", "–"]
                continue
            iqm = stats.stratified_bootstrap(per_env, stats.iqm, BOOTSTRAP_REPS)
            cells += [interval_number(stats.stratified_t_interval(per_env), signed=False),
                      interval_number(iqm, signed=False)]
            without = [interval_number(stats.stratified_t_interval([p for j, p in enumerate(per_env) if j != i]),
                                       signed=False) for i in range(len(envs))]
            leave_out.append(f"| {label} | {metric} | {cells[-2]} | " + " | ".join(without) + " |")
        runs = sum(len(groups[e][label]) for e in envs)
        lines.append(f"| {label} | {runs} | " + " | ".join(cells) + " |")
    return lines + leave_out


# -------------------------------------------------------------------------------------------- cost
def contaminated(record: dict) -> bool | None:
    """Whether a run's timing was taken while other work shared its cores: the 1-minute load average at
    its start or end above its own threads + LOAD_MARGIN (None: not recorded)."""
    summary = record.get("summary") or {}
    readings = [summary.get("load_1min_start"), summary.get("load_1min_end")]
    if any(r is None or not math.isfinite(float(r)) for r in readings):
        return None
    threads = int((record.get("config") or {}).get("threads") or (record.get("machine") or {}).get("torch_threads") or 1)
    return any(float(r) > threads + LOAD_MARGIN for r in readings)


def cost_lines(groups: dict) -> list[str]:
    """Wall-clock per env step of each variant, its ratio to Double DQN's, and whether the timings are clean."""
    rows = []
    for env, variants in groups.items():
        base = baseline_label(variants)
        base_t = np.mean([r.sec_per_step for r in variants[base].values()]) if base else None
        for label, by_seed in variants.items():
            t = [r.sec_per_step for r in by_seed.values() if r.sec_per_step is not None]
            if not t:
                continue
            flags = [contaminated(r.record) for r in by_seed.values()]
            timing = ("load not recorded" if all(f is None for f in flags) else
                      f"{sum(f is False for f in flags)}/{len(flags)} clean"
                      + (f", ⚠ {sum(f is True for f in flags)} contaminated" if any(flags) else ""))
            ratio = f"{np.mean(t) / base_t:.2f}" if base_t else "–"
            rows.append(f"| {env} | {label} | {1e3 * np.mean(t):.2f} | {ratio} | {timing} |")
    if not rows:
        return []
    return ["", "#### Cost (wall-clock of acting and learning per env step over the second half of each run, where "
            "recorded: the steady state; mean over seeds)", "",
            f"A timing is contaminated when the 1-minute load average at the run's start or end exceeded its own "
            f"threads + {LOAD_MARGIN} (other work shared the cores): compare ratios from clean runs only.", "",
            "| env | agent | ms per step | ratio to ddqn | timings |", "|---|---|---|---|---|", *rows]


# ------------------------------------------------------------------------------------------ tuning
def tuning_of(records: list[dict]) -> Tuning | None:
    exp = next((r["config"]["exp"] for r in records if (r.get("config") or {}).get("exp", {}).get("tuning")), None)
    return Tuning.from_config(exp) if exp else None


def tuning_records(records: list[dict], profile: str) -> list[dict]:
    """The records of ``profile`` of the same table, read from beside these records' files (a section's
    hook sees its own records only; the reported section checks its settings against the tuning section)."""
    if records and records[0].get("profile") == profile:
        return records
    folders = sorted({Path(r["_path"]).parents[1] for r in records if r.get("_path")})
    return [r for f in folders for r in load_records(f.parent, f.name) if r.get("profile") == profile]


def choose(tuned: list[dict], tuning: Tuning) -> dict:
    """Each agent's choice (``study.select``) from the tuning records, scored by their normalised AUC
    (normalised by the random-policy records among them)."""
    refs = references(tuned) if tuned else {}
    by_record = {id(r.record): r for r in runs_of(tuned)}

    def score(rec: dict) -> float | None:
        run = by_record.get(id(rec))
        return None if run is None or run.env not in refs else normalised(run, refs, "normalised AUC")

    return select(tuned, tuning, score)


def selection_lines(records: list[dict]) -> list[str]:
    """The tuning choice of every agent (its rule, the settings tried with their scores, its cost), and,
    in the reported section, whether each agent's runs used the chosen setting."""
    tuning = tuning_of(records)
    if tuning is None:
        return []
    choices = choose(tuning_records(records, tuning.profile), tuning)
    reported = records[0].get("profile") != tuning.profile
    lines = ["", f"#### Tuning: each agent's own knobs, chosen on {', '.join(tuning.envs)} with tuning seeds "
             f"{', '.join(map(str, tuning.seeds))} (profile `{tuning.profile}`)", "", f"Rule: {RULE}.", ""]
    if reported:
        overlap = sorted({r.get("seed") for r in records} & set(tuning.seeds))
        lines += [("Reported seeds overlap the tuning seeds: " + ", ".join(map(str, overlap))) if overlap
                  else "Reported seeds and tuning seeds are disjoint.", ""]
    lines += ["| agent | knobs | settings tried: mean normalised AUC (runs) | chosen | tuning runs | tuning seconds |"
              + (" reported runs use |" if reported else ""), "|---|---|---|---|---|---|" + ("---|" if reported else "")]
    for agent, c in choices.items():
        tried = "; ".join(f"{'★ ' if s == c.chosen else ''}{c.grid.label(s)}: {number(v) if math.isfinite(v) else '–'} ({n})"
                          for s, v, n in c.scores)
        chosen = c.grid.label(c.chosen) if c.chosen else f"none yet ({len(c.missing)} tuning runs missing)"
        row = f"| {agent} | {', '.join(map(short_path, c.grid.knobs))} | {tried} | {chosen} | {c.runs} | {c.seconds:.0f} |"
        if reported:
            row += f" {used_setting(records, agent, c)} |"
        lines.append(row)
    return lines


def used_setting(records: list[dict], agent: str, choice) -> str:
    """Whether the reported runs of ``agent`` used the chosen setting: ✓, or what they used instead."""
    used = {setting_of(r, choice.grid) for r in records if r["rows"][0]["keys"].get("agent") == agent}
    if not used:
        return "no runs"
    if choice.chosen is None:
        return "unchecked: no choice"
    wrong = sorted(used - {choice.chosen}, key=str)
    return "✓ the choice" if not wrong else "✗ " + "; ".join(choice.grid.label(s) for s in wrong)


# ----------------------------------------------------------------------------------------- the hooks
def normalisation_lines(refs: dict[str, Reference]) -> list[str]:
    lines = ["#### Normalised scores", "", "(R − random) / (reference − random): 0 = the uniform random policy's mean "
             "return, 1 = the reference score."]
    for env, ref in refs.items():
        random = "–" if ref.random is None else number(ref.random)
        lines.append(f"- {env} ({ref.env_id}): random = {random} ({ref.random_source}), reference = "
                     f"{number(ref.reference)} ({ref.reference_source})")
    return lines


def comparisons(records: list[dict]) -> list[str]:
    """Markdown lines for one section: the normalisation, what the kernel adds (the headline and its
    claim), every agent against Double DQN, aggregates across environments, the tuning choice, the cost."""
    runs = runs_of(records)
    if not runs:
        return []
    refs, groups = references(records), grouped(runs)
    if records[0].get("profile") == COST_PROFILE:
        return cost_lines(groups)
    tuning = tuning_of(records)
    tuning_section = tuning is not None and records[0].get("profile") == tuning.profile
    lines = normalisation_lines(refs) + headline(groups, refs) + against_baseline(groups, refs)
    if not tuning_section:
        lines += aggregates(groups, refs)
    return lines + selection_lines(records) + cost_lines(groups)


def summarize(records: list[dict]) -> list[dict]:
    """Per env and variant: seeds, mean [95% t-interval] of the final return and the normalised scores,
    the seeds that reached the reference score, ms per env step."""
    runs = runs_of(records)
    refs, out = references(records), []
    for env, variants in grouped(runs).items():
        for label, by_seed in variants.items():
            row = {"env": env, "agent": label, "n": len(by_seed)}
            for metric in ("final return", "normalised final", "normalised AUC"):
                v = list(values(by_seed, refs, metric).values())
                row[f"{metric}: mean [95% t-interval]"] = interval_number(stats.t_interval(v), signed=False) if v else "–"
            row["reached reference"] = f"{sum(r.reached for r in by_seed.values())}/{len(by_seed)}"
            t = [r.sec_per_step for r in by_seed.values() if r.sec_per_step is not None]
            row["ms per step"] = f"{1e3 * np.mean(t):.2f}" if t else "–"
            out.append(row)
    return out


def make_figure(records: list[dict], path: Path) -> None:
    """Learning curves of every profile, env and variant (``ddqn_figures.draw_curves``)."""
    from experiments.reports.ddqn_figures import draw_curves

    draw_curves(records, path)


def extra_figures(records: list[dict]) -> list:
    """Performance profiles, one figure per profile with records on several envs (``ddqn_figures``)."""
    from experiments.reports.ddqn_figures import performance_profiles

    return performance_profiles(records)
