"""The skeleton: configs compose, the entry point fails clearly, sweeps and launchers leave records."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.core.runner import known_experiments, pick_device

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


def records_in(tmp_path: Path, exp: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs" / exp).glob("**/*.json"))]


def test_known_experiments_are_the_papers_four_and_smoke():
    assert {"cnn_readout", "vit_probe", "transfer", "ddqn", "smoke"} <= set(known_experiments())


@pytest.mark.parametrize("exp", known_experiments())
@pytest.mark.parametrize("profile", ["quick", "paper", "smoke"])
def test_every_experiment_config_composes(exp, profile):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+exp={exp}", f"profile={profile}", "paths.root=/tmp/x"])
    assert cfg.exp.name == exp
    for group in ("data", "backbone", "sk", "logger"):
        assert "name" in cfg[group] or group == "sk"
    assert cfg.profile == profile
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_unknown_experiment_lists_the_known_ones(cli):
    proc = cli("+exp=no_such_thing", "logger=none", check=False)
    assert proc.returncode != 0
    assert "no_such_thing" in proc.stderr
    for name in ("cnn_readout", "smoke", "ddqn"):
        assert name in proc.stderr


def test_missing_experiment_says_how_to_choose(cli):
    proc = cli("logger=none", check=False)
    assert proc.returncode != 0
    assert "+exp=NAME" in proc.stderr and "smoke" in proc.stderr


def test_bad_profile_and_device_fail_clearly(cli):
    proc = cli("+exp=smoke", "logger=none", "profile=huge", check=False)
    assert proc.returncode != 0 and "profile/huge" in proc.stderr and "quick" in proc.stderr
    with pytest.raises(ValueError, match="device must be"):
        pick_device("tpu")


def test_single_run_writes_a_complete_record(cli, tmp_path):
    cli("+exp=smoke", "logger=none", "seed=3")
    (rec,) = records_in(tmp_path, "smoke")
    assert rec["seed"] == 3 and rec["experiment"] == "smoke" and rec["profile"] == "quick"
    assert rec["config"]["sk"]["k"] == 32 and rec["duration_s"] > 0
    assert {"cpu", "torch", "cpu_count"} <= set(rec["machine"])
    assert rec["git_commit"] and "seed=3" in rec["command"]
    probes = {r["keys"]["probe"]: r["metrics"]["test_acc"] for r in rec["rows"]}
    assert set(probes) == {"sk", "knn"}
    assert all(0.8 < acc <= 1.0 for acc in probes.values())  # digits on raw pixels is easy
    assert not list((tmp_path / "outputs").glob("**/wandb"))


def test_same_seed_same_numbers(cli, tmp_path):
    cli("-m", "+exp=smoke", "logger=none", "seed=1,1")
    a, b = records_in(tmp_path, "smoke")
    assert [r["metrics"]["test_acc"] for r in a["rows"]] == [r["metrics"]["test_acc"] for r in b["rows"]]
    assert [r["info"] for r in a["rows"]] == [r["info"] for r in b["rows"]]
    assert a["summary"]["val_acc"] == b["summary"]["val_acc"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_multirun_with_launcher_leaves_one_record_per_job(cli, tmp_path, launcher):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    cli("-m", f"hydra/launcher={launcher}", *extra, "+exp=smoke", "logger=none", "seed=0,1", "sk.tune=false", "sk.k=4,8")
    recs = records_in(tmp_path, "smoke")
    assert len(recs) == 4
    assert sorted((r["seed"], r["config"]["sk"]["k"]) for r in recs) == [(0, 4), (0, 8), (1, 4), (1, 8)]


def test_slurm_launcher_config_is_shipped():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=smoke", "hydra/launcher=slurm", "paths.root=/tmp/x"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_wandb_offline_writes_run_files_one_group_per_sweep(cli, tmp_path):
    cli("-m", "+exp=smoke", "seed=0,1", "sk.tune=false", f"logger.dir={tmp_path}/wb", env={"WANDB_MODE": None})
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # each job finished its own run
    assert all(list(r.glob("*.wandb")) for r in runs)
    groups = {rec["wandb_group"] for rec in records_in(tmp_path, "smoke")}
    assert len(groups) == 1 and groups.pop().startswith("smoke-")


def test_logger_none_writes_no_tracker_files(cli, tmp_path):
    cli("+exp=smoke", "logger=none", "sk.tune=false", f"+unused_dir={tmp_path}/wb")
    assert not list(tmp_path.glob("**/offline-run-*"))
    assert records_in(tmp_path, "smoke")[0]["wandb_group"] is None


def test_online_without_key_fails_clearly(cli, tmp_path):
    proc = cli("+exp=smoke", "logger.mode=online", "sk.tune=false", f"logger.dir={tmp_path}/wb",
               env={"WANDB_API_KEY": "", "HOME": str(tmp_path)}, check=False)
    assert proc.returncode != 0 and "WANDB_API_KEY" in proc.stderr
    assert not records_in(tmp_path, "smoke")


def test_optuna_sweep_over_sk_hyperparameters(cli, tmp_path):
    proc = cli("-m", "+exp=smoke", "+hparams_search=sk_optuna", "logger=none", "hydra.sweeper.n_trials=3")
    recs = records_in(tmp_path, "smoke")
    assert len(recs) == 3
    assert len({(r["config"]["sk"]["k"], r["config"]["sk"]["kernel"]) for r in recs}) >= 2
    assert "Best value" in proc.stdout + proc.stderr or (tmp_path / "multirun" / "optimization_results.yaml").exists()


# ---------------------------------------------------------------------------- one home per knob (issue 11)
def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "paths.root=/tmp/x"])


@pytest.mark.parametrize("exp, key, profile_value, cli_value", [
    ("cnn_readout", "exp.train_size", 600, 500),
    ("cnn_readout", "sk.grid.k", [8, 16], [12]),
    ("vit_probe", "threads", 1, 2),
    ("transfer", "backbone.img_size", 32, 40),
])
def test_the_command_line_wins_over_the_profile(exp, key, profile_value, cli_value):
    from omegaconf import OmegaConf as OC

    as_cli = f"[{','.join(map(str, cli_value))}]" if isinstance(cli_value, list) else str(cli_value)
    assert OC.select(compose_cfg(f"+exp={exp}", "profile=smoke"), key) == profile_value  # the profile applies ...
    cfg = compose_cfg(f"+exp={exp}", "profile=smoke", f"{key}={as_cli}")
    assert OC.select(cfg, key) == cli_value  # ... and the command line overrides it
    assert cfg.profile == "smoke"


@pytest.mark.parametrize("args, key", [
    (["+exp=smoke", "sk.kk=8"], "sk.kk"),                      # a typo
    (["+exp=smoke", "sk.head.k=8"], "sk.head.k"),              # smoke trains no SK head
    (["+exp=vit_probe", "sk.head.k=8"], "sk.head.k"),          # neither does vit_probe
    (["+exp=cnn_readout", "exp.sk_head.k=8"], "exp.sk_head.k"),  # the head's old home: now sk.head
    (["+exp=cnn_readout", "exp.sk_grid.k=[8]"], "exp.sk_grid.k"),
    (["+exp=smoke", "data.val_size=10"], "data.val_size"),     # no experiment read it: cnn_readout has exp.val_size
])
def test_a_key_the_experiment_does_not_read_fails_and_names_it(cli, tmp_path, args, key):
    proc = cli(*args, "logger=none", check=False)
    assert proc.returncode != 0
    assert f"Could not override '{key}'" in proc.stderr and "not in struct" in proc.stderr
    assert not records_in(tmp_path, args[0].split("=")[1])


def test_sk_overrides_reach_the_smoke_probe(cli, tmp_path):
    cli("+exp=smoke", "logger=none", "profile=smoke", "sk.grid.k=[7]", "sk.grid.kernel=[laplacian]")
    cli("+exp=smoke", "logger=none", "profile=smoke", "sk.tune=false", "sk.k=5", "sk.kernel=imq", "sk.ridge=0.5")
    tuned, fixed = _by_command(records_in(tmp_path, "smoke"), "sk.grid.k=[7]")
    assert tuned["profile"] == fixed["profile"] == "smoke"
    chosen = {r["keys"]["probe"]: r["info"].get("chosen") for r in tuned["rows"]}
    assert chosen["sk"].startswith("k=7, kernel=laplacian,")  # the smoke grid holds k = 8, 16 only
    chosen = {r["keys"]["probe"]: r["info"].get("chosen") for r in fixed["rows"]}
    assert chosen["sk"].startswith("k=5, kernel=imq,") and chosen["sk"].endswith("ridge=0.5")


def _by_command(recs: list[dict], marker: str) -> tuple[dict, dict]:
    """(the record whose command holds ``marker``, the other one)."""
    (a,) = [r for r in recs if marker in r["command"]]
    (b,) = [r for r in recs if marker not in r["command"]]
    return a, b


def test_a_profile_sweep_writes_one_record_per_profile(cli, tmp_path):
    cli("-m", "+exp=smoke", "logger=none", "profile=quick,smoke", "sk.tune=false")
    recs = records_in(tmp_path, "smoke")
    assert sorted(r["profile"] for r in recs) == ["quick", "smoke"]
    assert sorted(p.parent.name for p in (tmp_path / "results" / "runs" / "smoke").glob("*/*.json")) == ["quick", "smoke"]


def test_an_hparams_search_the_experiment_cannot_serve_fails_before_running(cli, tmp_path):
    proc = cli("-m", "+exp=transfer", "+hparams_search=sk_optuna", "logger=none", "hydra.sweeper.n_trials=1",
               check=False)
    assert proc.returncode != 0
    assert "objective='val_acc' is not reported by experiment 'transfer'" in proc.stdout + proc.stderr
    assert not records_in(tmp_path, "transfer")
