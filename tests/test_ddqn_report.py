"""The Double DQN report (experiments/reports/ddqn.py) on hand-made records: normalisation from measured
random scores, paired t-intervals, Holm, computed verdicts that flip with the data, aggregates with and
without each env, the cost flags, the tuning choice and its check; and the study's protocol."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.ddqn.study import Tuning, short_path
from experiments.reports import ddqn as report

ROOT = Path(__file__).resolve().parents[1]
ENVS = {"cartpole": {"env_id": "CartPole-v1", "threshold": None, "reference": "gymnasium's reward_threshold"},
        "acrobot": {"env_id": "Acrobot-v1", "threshold": None, "reference": "gymnasium's reward_threshold"}}
REFERENCE = {"cartpole": 475.0, "acrobot": -100.0}
RANDOM = {"cartpole": 25.0, "acrobot": -500.0}
TUNING = {"profile": "tune", "envs": ["cartpole", "acrobot"], "seeds": [1000, 1001],
          "grid": {"ddqn": {"knobs": ["exp.agents.ddqn.lr_scale"], "settings": [[1.0], [0.5]]},
                   "ddqn_mc": {"knobs": ["exp.agents.ddqn_mc.mix"], "settings": [[0.5], [0.25]]}}}


def record(env: str, agent: str, seed: int, final: float, curve_mean: float | None = None, profile: str = "quick",
           sec: float = 1e-3, load: tuple | None = (0.5, 0.6), config: dict | None = None) -> dict:
    """A run record as the runner writes it (curve_mean defaults to the final return)."""
    cm = final if curve_mean is None else curve_mean
    exp = {"env": env, "agent": agent, "envs": ENVS, "agents": {"ddqn": {"lr_scale": 1.0}, "ddqn_mc": {"mix": 0.5},
                                                                 "sk_episodic": {"mix": 0.5}}, "tuning": TUNING}
    cfg = copy.deepcopy({"exp": exp, "sk": {"head": {"ridge": 1.0, "k": 16}}, "threads": 1, "profile": profile})
    for path, value in (config or {}).items():  # dotted overrides
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    summary = {} if load is None else {"load_1min_start": load[0], "load_1min_end": load[1]}
    return {"seed": seed, "profile": profile, "started_utc": f"2026-01-01T00:00:{seed % 60:02d}", "config": cfg,
            "duration_s": 10.0, "summary": summary,
            "rows": [{"keys": {"env": env, "agent": agent},
                      "metrics": {"final_return": final, "curve_mean": cm, "reached_threshold": float(final >= REFERENCE[env]),
                                  "sec_per_step": sec},
                      "info": {"env_id": ENVS[env]["env_id"], "threshold": str(REFERENCE[env])}}],
            "curves": {"eval_return": {"x": [1, 2], "y": [2 * cm - final, final]}}}


def random_records(profile: str = "quick") -> list[dict]:
    out = []
    for env, value in RANDOM.items():
        rec = record(env, "random", 0, value, profile=profile)
        rec["rows"][0]["info"]["episodes"] = "100"
        out.append(rec)
    return out


def study(design2: dict, control: dict, base: dict, envs=("cartpole", "acrobot")) -> list[dict]:
    """Records of the three agents of the headline on ``envs``: {env: [final return per seed]} each."""
    recs = random_records()
    for agent, finals in (("sk_episodic", design2), ("ddqn_mc", control), ("ddqn", base)):
        for env in envs:
            recs += [record(env, agent, seed, v) for seed, v in enumerate(finals[env])]
    return recs


def headline(recs: list[dict]) -> list[str]:
    return report.headline(report.grouped(report.runs_of(recs)), report.references(recs))


def claim(lines: list[str]) -> str:
    """The claim line and the headline row it rests on (design 2 − the control across environments)."""
    (line,) = [x for x in lines if x.startswith("- **Claim**")]
    (row,) = [x for x in lines if x.startswith("- `sk_episodic − ddqn_mc, normalised final")]
    return line + "\n" + row


# ------------------------------------------------------------------------------------ normalisation
def test_normalisation_reads_the_measured_random_scores():
    recs = study({"cartpole": [250.0] * 3, "acrobot": [-300.0] * 3}, {"cartpole": [250.0] * 3, "acrobot": [-300.0] * 3},
                 {"cartpole": [250.0] * 3, "acrobot": [-300.0] * 3})
    refs = report.references(recs)
    assert refs["cartpole"].random == 25.0 and refs["cartpole"].reference == 475.0
    assert "measured: 100 episodes" in refs["cartpole"].random_source
    run = next(r for r in report.runs_of(recs) if r.env == "cartpole")
    assert report.normalised(run, refs, "normalised final") == pytest.approx((250 - 25) / (475 - 25))
    # A measured random score of 70 moves the 0: the normalised score follows the records, not a typed number.
    recs[0]["rows"][0]["metrics"]["final_return"] = 70.0
    assert report.normalised(run, report.references(recs), "normalised final") == pytest.approx((250 - 70) / (475 - 70))


def test_old_records_fall_back_to_their_typed_random_return_and_say_so():
    recs = [record("cartpole", "ddqn", s, 200.0, config={"exp.envs.cartpole.random_return": 20.0}) for s in range(2)]
    (ref,) = report.references(recs).values()
    assert ref.random == 20.0 and "typed into the record's config" in ref.random_source
    bare = report.references([record("cartpole", "ddqn", 0, 200.0)])["cartpole"]
    assert bare.random is None and "not measured" in bare.random_source
    assert report.summarize([record("cartpole", "ddqn", 0, 200.0)])[0]["normalised final: mean [95% t-interval]"] == "–"


# --------------------------------------------------------------------------------- verdicts, Holm
def test_headline_claim_verdict_is_computed_and_flips_with_the_data():
    ahead = {"cartpole": [300.0, 320.0, 310.0, 305.0], "acrobot": [-200.0, -190.0, -195.0, -205.0]}
    behind = {"cartpole": [200.0, 210.0, 190.0, 205.0], "acrobot": [-300.0, -310.0, -290.0, -295.0]}
    base = {"cartpole": [100.0, 110.0, 90.0, 100.0], "acrobot": [-400.0, -390.0, -410.0, -400.0]}
    better = headline(study(ahead, behind, base))
    assert "**Verdict: held**" in claim(better) and claim(better).endswith("**better**")
    worse = headline(study(behind, ahead, base))
    assert "**Verdict: contradicted**" in claim(worse) and claim(worse).endswith("**worse**")
    noisy = {"cartpole": [310.0, 190.0, 320.0, 195.0], "acrobot": [-190.0, -310.0, -195.0, -295.0]}
    assert "**Verdict: not shown**" in claim(headline(study(noisy, behind, base)))
    # The headline table pairs each env's design 2 with the control and with Double DQN.
    text = "\n".join(better)
    assert "| cartpole | sk_episodic − ddqn_mc |" in text and "| acrobot | sk_episodic − ddqn |" in text
    assert "| without cartpole | sk_episodic − ddqn_mc |" in text


def test_a_margin_separated_alone_is_not_separated_after_holm():
    # Per-seed differences 1, 3, 0.5, 2.5, 2 (t = 3.9 on 4 degrees of freedom, p = 0.018): alone, the t-interval
    # excludes 0; among four comparisons whose others are null, Holm's first step asks for the 1 - 0.05/4 level.
    base = [100.0, 200.0, 300.0, 400.0, 500.0]
    diffs = [1.0, 3.0, 0.5, 2.5, 2.0]
    recs = random_records() + [record("cartpole", "ddqn", s, v) for s, v in enumerate(base)]
    recs += [record("cartpole", "sk_episodic", s, v + d) for s, (v, d) in enumerate(zip(base, diffs))]
    alone = "\n".join(report.against_baseline(report.grouped(report.runs_of(recs)), report.references(recs)))
    assert "| cartpole | sk_episodic − ddqn | +1.8 [" in alone and "(n=5) | better |" in alone
    for agent in ("ddqn_mc", "sk", "sk_td"):
        recs += [record("cartpole", agent, s, v + (-1) ** s * 30.0) for s, v in enumerate(base)]
    together = report.against_baseline(report.grouped(report.runs_of(recs)), report.references(recs))
    line = next(x for x in together if x.startswith("| cartpole | sk_episodic − ddqn |"))
    assert "(n=5) | not separated |" in line and "4 comparisons per metric, Holm-corrected" in together[1]


def test_aggregates_show_a_lead_carried_by_one_environment():
    # Design 2 leads Double DQN on cartpole only; acrobot is a tie.
    d2 = {"cartpole": [400.0, 420.0, 410.0], "acrobot": [-300.0, -290.0, -310.0]}
    base = {"cartpole": [100.0, 120.0, 110.0], "acrobot": [-300.0, -290.0, -310.0]}
    recs = study(d2, base, base)
    groups, refs = report.grouped(report.runs_of(recs)), report.references(recs)
    every = report.aggregate_difference(groups, refs, ["cartpole", "acrobot"], "sk_episodic", "ddqn", "normalised final")
    without = report.aggregate_difference(groups, refs, ["acrobot"], "sk_episodic", "ddqn", "normalised final")
    assert every.estimate == pytest.approx((300 / 450 + 0.0) / 2) and every.n == 6
    assert without.estimate == pytest.approx(0.0)
    lines = report.aggregates(groups, refs)
    assert any(x.startswith("| sk_episodic | normalised final |") for x in lines)
    assert "without cartpole" in "\n".join(lines)


# -------------------------------------------------------------------------------------------- cost
def test_cost_flags_timings_taken_under_load():
    recs = random_records()
    recs += [record("cartpole", "ddqn", s, 100.0, sec=1e-3) for s in range(3)]
    recs += [record("cartpole", "sk_td", s, 100.0, sec=1.5e-3, load=(2.4, 1.0) if s == 0 else (0.9, 1.1)) for s in range(3)]
    recs += [record("cartpole", "ddqn_mc", s, 100.0, load=None) for s in range(3)]
    lines = report.cost_lines(report.grouped(report.runs_of(recs)))
    assert "| cartpole | sk_td | 1.50 | 1.50 | 2/3 clean, ⚠ 1 contaminated |" in lines
    assert "| cartpole | ddqn | 1.00 | 1.00 | 3/3 clean |" in lines
    assert "| cartpole | ddqn_mc | 1.00 | 1.00 | load not recorded |" in lines
    cost = [r for r in recs if r["rows"][0]["keys"]["agent"] != "random"]
    for r in cost:
        r["profile"] = report.COST_PROFILE
    assert report.comparisons(cost)[1].startswith("#### Cost")  # the cost section shows the cost only


# ------------------------------------------------------------------------------------------- labels
def test_variants_are_named_by_the_knobs_that_differ():
    recs = random_records()
    for ridge in (0.1, 1.0):
        recs += [record("cartpole", "sk_td", s, 100.0 + ridge, config={"sk.head.ridge": ridge}) for s in range(2)]
    recs += [record("cartpole", "ddqn", s, 100.0, config={"sk.head.ridge": 5.0}) for s in range(2)]  # ddqn reads no sk.head
    labels = sorted({r.label for r in report.runs_of(recs)})
    assert labels == ["ddqn", "sk_td (sk.head.ridge=0.1)", "sk_td (sk.head.ridge=1.0)"]
    used = report.used_config(recs[-1]["config"])
    assert "sk" not in used and used["exp"]["agents"] == {"ddqn": {"lr_scale": 1.0}} and list(used["exp"]["envs"]) == ["cartpole"]
    assert short_path("exp.agents.ddqn_mc.mix") == "mix" and short_path("sk.head.k") == "sk.head.k"


# ------------------------------------------------------------------------------------------ tuning
def tuning_records(scores: dict, seeds=(1000, 1001)) -> list[dict]:
    """Tune-profile records: {(agent, knob value): normalised AUC on both envs}."""
    recs = random_records("tune")
    for (agent, value), score in scores.items():
        path = {"ddqn": "exp.agents.ddqn.lr_scale", "ddqn_mc": "exp.agents.ddqn_mc.mix"}[agent]
        for env in ENVS:
            cm = RANDOM[env] + score * (REFERENCE[env] - RANDOM[env])
            recs += [record(env, agent, s, cm, curve_mean=cm, profile="tune", config={path: value}) for s in seeds]
    return recs


def test_tuning_chooses_by_the_rule_and_the_reported_runs_are_checked(tmp_path):
    tuned = tuning_records({("ddqn", 1.0): 0.4, ("ddqn", 0.5): 0.6, ("ddqn_mc", 0.5): 0.5, ("ddqn_mc", 0.25): 0.3})
    choices = report.choose(tuned, Tuning.from_config({"tuning": TUNING}))
    assert choices["ddqn"].chosen == (0.5,) and choices["ddqn_mc"].chosen == (0.5,)
    assert choices["ddqn"].runs == 8 and choices["ddqn"].seconds == pytest.approx(80.0)
    tune_lines = "\n".join(report.comparisons(tuned))
    assert "★ lr_scale=0.5: 0.6 (4)" in tune_lines and "| ddqn_mc | mix |" in tune_lines
    # The reported section reads the tuning records from beside its own files and checks its settings.
    for i, rec in enumerate(tuned):
        path = tmp_path / "runs" / "ddqn" / "tune" / f"{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    reported = random_records() + [record("cartpole", "ddqn", s, 300.0, config={"exp.agents.ddqn.lr_scale": 0.5})
                                   for s in range(3)]
    reported += [record("cartpole", "ddqn_mc", s, 300.0, config={"exp.agents.ddqn_mc.mix": 0.25}) for s in range(3)]
    for i, rec in enumerate(reported):
        rec["_path"] = str(tmp_path / "runs" / "ddqn" / "quick" / f"{i}.json")
    lines = "\n".join(report.selection_lines(reported))
    assert "Reported seeds and tuning seeds are disjoint." in lines
    assert "| ddqn | lr_scale |" in lines and "✓ the choice |" in lines
    assert "✗ mix=0.25 |" in lines  # the control ran with a setting that was not chosen


def test_an_incomplete_tuning_chooses_nothing():
    tuned = tuning_records({("ddqn", 1.0): 0.4, ("ddqn", 0.5): 0.6}, seeds=(1000,))
    choice = report.choose(tuned, Tuning.from_config({"tuning": TUNING}))["ddqn"]
    assert choice.chosen is None and "seed 1001" in choice.missing[0]
    from scripts import ddqn_study

    with pytest.raises(ValueError, match="tuning is incomplete"):
        ddqn_study.chosen_overrides(Tuning.from_config({"tuning": TUNING}), Path("/nonexistent"))


def test_each_grid_starts_at_the_agents_defaults_and_tunes_its_own_knobs():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=ddqn"])
    exp = {"exp": OmegaConf.to_container(cfg.exp, resolve=True), "sk": OmegaConf.to_container(cfg.sk, resolve=True)}
    tuning = Tuning.from_config(exp["exp"])
    from experiments.ddqn.study import lookup

    for agent, grid in tuning.grids.items():
        assert tuple(lookup(exp, k) for k in grid.knobs) == grid.settings[0], agent
        assert all(k.startswith(f"exp.agents.{agent}.") or k.startswith("sk.head.") for k in grid.knobs)
    counts = {len(g.settings) for g in tuning.grids.values()}
    assert max(counts) - min(counts) <= 1  # every agent a comparable number of settings
    assert not set(tuning.seeds) & set(range(10))  # the tuning seeds are not reported seeds
    with pytest.raises(ValueError, match="one value per knob"):
        Tuning.from_config({"tuning": {**TUNING, "grid": {"ddqn": {"knobs": ["a", "b"], "settings": [[1.0]]}}}})


def test_study_driver_commands(capsys):
    from scripts import ddqn_study

    assert ddqn_study.main(["tune", "--env", "cartpole", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    tuning = Tuning.from_config(ddqn_study.composed_exp())
    assert len(out) == sum(len(g.settings) for g in tuning.grids.values())
    assert all("profile=tune" in line and "exp.env=cartpole" in line and "seed=1000," in line for line in out)
    assert ddqn_study.main(["random", "--dry-run"]) == 0
    assert "exp.agent=random" in capsys.readouterr().out
    assert ddqn_study.seeds("0-4") == [0, 1, 2, 3, 4] and ddqn_study.seeds("3,5") == [3, 5]


# -------------------------------------------------------------------------- table keys from the config
def test_a_ridge_sweep_gives_two_rows_in_the_built_table(cli, tmp_path):
    """Issue 17: every knob that differs between records is part of the row key (derived from the config)."""
    from scripts import make_tables

    cli("-m", "+exp=ddqn", "profile=smoke", "logger=none", "exp.agent=sk_td", "sk.head.ridge=0.1,1", "seed=0")
    runs = tmp_path / "results" / "runs"
    make_tables.build("ddqn", runs, tmp_path / "out", allow_uncommitted=True)
    md = (tmp_path / "out" / "ddqn.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| sk_td | cartpole |")]
    assert len(rows) == 2, md
    assert "sk_td (sk.head.ridge=0.1)" in md and "sk_td (sk.head.ridge=1)" in md  # the comparisons' names


def test_the_reported_runs_use_the_choice(tmp_path, monkeypatch, capsys):
    from scripts import ddqn_study

    for i, rec in enumerate(tuning_records({("ddqn", 1.0): 0.4, ("ddqn", 0.5): 0.6, ("ddqn_mc", 0.5): 0.5,
                                            ("ddqn_mc", 0.25): 0.3})):
        path = tmp_path / "ddqn" / "tune" / f"{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    monkeypatch.setattr(ddqn_study, "composed_exp", lambda profile="quick": {"tuning": TUNING})
    assert ddqn_study.main(["run", "--env", "cartpole", "--seeds", "0-2", "--runs", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("exp.agent=")[1].split()[0] for line in out] == ["ddqn", "ddqn_mc"]
    assert "exp.agents.ddqn.lr_scale=0.5 seed=0,1,2" in out[0] and "profile=quick exp.env=cartpole" in out[0]
    assert "exp.agents.ddqn_mc.mix=0.5" in out[1]
