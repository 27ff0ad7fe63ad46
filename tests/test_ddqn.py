"""Kernel-augmented Double DQN (experiments/ddqn.py): targets, SK heads, checkpoints, records, statistics."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from experiments import ddqn

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def settings(agent: str, env: str = "cartpole", total_steps: int = 800, **env_overrides) -> dict:
    """A small CartPole run: training after 200 steps, a burst every 50, a 64-point SK support refreshed every 250."""
    tiny = {"total_steps": total_steps, "learning_starts": 200, "train_freq": 50, "gradient_steps": 10,
            "batch_size": 32, "hidden": "[32,32]", "eval_interval": 400, "exploration_steps": 400, **env_overrides}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+exp=ddqn", f"exp.agent={agent}", f"exp.env={env}", "exp.eval_episodes=2", "sk.head.support_size=64",
            "sk.head.k=8", "sk.head.refresh_interval=250", *[f"exp.envs.{env}.{k}={v}" for k, v in tiny.items()]])
    return ddqn.resolve_settings(cfg.exp, cfg.sk.head)


# ------------------------------------------------------------------------------------ the algorithm
class TableQ(nn.Module):
    """Q(s, ·) = table[s] for integer states 0, 1, 2."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, obs, actions=None):
        return ddqn.at(self.table[obs.long().view(-1)], actions)


def test_double_dqn_target_hand_computed():
    rewards, dones, next_obs = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0, 1, 2])
    online = TableQ([[1.0, 2.0], [3.0, 0.0], [0.0, 9.0]])   # argmax: 1, 0, 1
    target = TableQ([[5.0, 3.0], [4.0, 1.0], [7.0, 8.0]])   # max: 5, 4, 8
    y = ddqn.double_dqn_target(rewards, dones, next_obs, online, target, 0.9)
    # Q_target at the online network's choice: 3 (row 0), 4 (row 1); row 2 is terminal.
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 3.0, 0.5 + 0.9 * 4.0, 2.0]))
    y_dqn = ddqn.dqn_target(rewards, dones, next_obs, target, 0.9)
    assert torch.allclose(y_dqn, torch.tensor([1.0 + 0.9 * 5.0, 0.5 + 0.9 * 4.0, 2.0]))


def test_td_update_takes_the_argmax_from_the_online_network_and_the_value_from_the_target():
    online = TableQ([[0.0, 0.0], [1.0, 2.0]])     # at s' (state 1) the online network picks action 1
    target = TableQ([[0.0, 0.0], [5.0, 3.0]])     # ... which the target network values at 3 (its own max: 5)
    batch = (torch.tensor([[0.0]]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([[1.0]]), torch.tensor([0.0]))
    loss = ddqn.td_update(online, target, torch.optim.SGD(online.parameters(), lr=0.0), batch, gamma=0.5,
                          max_grad_norm=10.0)
    # y = 1 + 0.5 * 3 = 2.5 and Q(s, 0) = 0: Huber(2.5) = 2.5 - 0.5. Roles swapped: y = 1 + 0.5 * 1 -> 1.0;
    # plain DQN: y = 1 + 0.5 * 5 -> 3.0.
    assert float(loss) == pytest.approx(2.0)


def test_training_loop_passes_the_online_network_first_and_the_frozen_target_second(monkeypatch, one_thread):
    calls = []
    real = ddqn.td_update

    def spy(agent, target_agent, optimizer, batch, gamma, max_grad_norm):
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        calls.append((all(id(p) in trained for p in agent.parameters()),
                      not any(p.requires_grad for p in target_agent.parameters()), agent is not target_agent))
        return real(agent, target_agent, optimizer, batch, gamma, max_grad_norm)

    monkeypatch.setattr(ddqn, "td_update", spy)
    ddqn.train(settings("sk", total_steps=300), seed=0, device=CPU, checkpoint_path=None, checkpoint_interval=10**6)
    assert len(calls) == 20 and all(all(c) for c in calls)


# ----------------------------------------------------------------------------------------- SK heads
def filled_buffer(n: int = 40, episode: int = 10, action=lambda i: i % 2) -> ddqn.ReplayBuffer:
    rb, rng = ddqn.ReplayBuffer(100, (4,), np.float32), np.random.default_rng(0)
    for i in range(n):
        rb.add(rng.normal(size=4), action(i), float(i % 3), rng.normal(size=4), (i + 1) % episode == 0)
        if (i + 1) % episode == 0:
            rb.finish_episode(0.9)
    return rb


def test_sk_head_cache_follows_the_network_and_refresh_sets_residuals():
    torch.manual_seed(0)
    qnet = ddqn.QNetwork((4,), 2, "mlp", [16, 16])
    agent = ddqn.SKQNetwork(qnet, (4,), torch.float32, 2, support_size=32, k=8, kernel="gaussian",
                            lengthscale="auto", ridge=1e-6, learned_targets=False)
    target_agent = ddqn.SKQNetwork(ddqn.QNetwork((4,), 2, "mlp", [16, 16]), (4,), torch.float32, 2, 32, 8,
                                   "gaussian", "auto", 1e-6, False)
    obs = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(agent(obs), qnet(obs))  # no SK term before the first refresh
    assert agent.refresh(filled_buffer(), np.random.default_rng(0), target_agent, 0.99, CPU)
    y = agent.targets
    assert (y != 0).sum(1).max() == 1 and int((y != 0).sum()) >= 30  # the taken action's residual only
    # With a tiny ridge the augmented Q meets the bootstrap target at a support point (its own neighbour).
    with torch.no_grad():
        s0, a0 = agent.support_obs[:1], int(y[0].abs().argmax())
        assert torch.allclose(agent(s0)[0, a0], qnet(s0)[0, a0] + y[0, a0], atol=1e-3)
    # The cached support features follow an optimiser step, and equal a fresh computation.
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    with torch.no_grad():
        before = agent(obs)
    agent(obs).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after = agent(obs)
        fresh = qnet.head(qnet.features(obs)) + __import__("sk").sparse_krr(
            ddqn.psi(qnet.features(obs)), ddqn.psi(qnet.features(agent.support_obs)), agent.targets, k=8,
            lengthscale=agent.lengthscale, ridge=1e-6)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, fresh, atol=1e-5)


def test_discounted_returns_of_ended_episodes():
    rb = ddqn.ReplayBuffer(10, (1,), np.float32)
    for r in (1.0, 1.0, 1.0):
        rb.add([0.0], 0, r, [0.0], False)
    rng = np.random.default_rng(0)
    assert rb.recent_with_returns(1, 10, rng) is None  # the episode has not ended
    rb.finish_episode(0.5)                     # terminated: G = 1 + 0.5 (1 + 0.5 * 1)
    np.testing.assert_allclose(rb.returns[:3], [1.75, 1.5, 1.0])
    rb.start_episode()
    for r in (1.0, 2.0):
        rb.add([0.0], 1, r, [0.0], False)
    rb.finish_episode(0.5, bootstrap=4.0)      # cut by the time limit: completed with the value 4 of s_T
    np.testing.assert_allclose(rb.returns[3:5], [1.0 + 0.5 * (2.0 + 0.5 * 4.0), 2.0 + 0.5 * 4.0])
    assert sorted(rb.recent_with_returns(4, 4, rng)) == [1, 2, 3, 4]     # the 4 most recent
    assert sorted(rb.recent_with_returns(5, 10, rng)) == [0, 1, 2, 3, 4]  # every one
    assert rb.recent_with_returns(6, 10, rng) is None


def test_episodic_memory_mixes_the_return_into_the_target_and_its_own_action_only():
    torch.manual_seed(0)
    qnet = ddqn.QNetwork((4,), 2, "mlp", [16, 16])
    agent = ddqn.EpisodicQNetwork(qnet, (4,), torch.float32, 2, support_size=20, k=4, kernel="gaussian",
                                  lengthscale=0.1, ridge=1e-6, mix=0.25, window=20)
    rb = filled_buffer(40, action=lambda i: 0)  # only action 0 is remembered
    assert agent.refresh(rb, np.random.default_rng(0), None, 0.9, CPU)
    with torch.no_grad():
        assert torch.equal(agent(agent.support_obs), qnet(agent.support_obs))  # the online network: Q_theta
    agent.use_memory = True                                                   # the target network
    idx = rb.recent_with_returns(20, 20, np.random.default_rng(0))
    assert sorted(idx) == list(range(20, 40)) and agent.support_actions.tolist() == [0] * 20
    with torch.no_grad():
        s = agent.support_obs[:3]
        q_theta, q = qnet(s), agent(s)
    g = torch.as_tensor(rb.returns[idx[:3]])
    # At a remembered (s_j, a_j): (1 - w) Q_theta + w G_j (a small ridge interpolates the memory) ...
    assert torch.allclose(q[:, 0], 0.75 * q_theta[:, 0] + 0.25 * g, atol=1e-3)
    # ... and action 1, of which there is no memory, keeps the network's value (its neighbours are memories
    # of action 0, at least 2 sqrt(2) away in the state-action embedding).
    assert torch.allclose(q[:, 1], q_theta[:, 1], atol=1e-6)


# -------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("agent", ["sk", "sk_episodic"])
def test_interrupted_run_resumes_from_checkpoint(tmp_path, one_thread, agent):
    s = settings(agent)
    reference = ddqn.train(s, seed=3, device=CPU, checkpoint_path=None, checkpoint_interval=250)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(ddqn.RunInterrupted):
        ddqn.train(s, seed=3, device=CPU, checkpoint_path=ckpt, checkpoint_interval=250, stop_after_steps=600)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 500 <= saved["step"] < 600 and saved["replay_buffer"]["size"] == saved["step"]
    assert bool(saved["agent"]["active"])  # the SK head (support set, targets) is in the checkpoint

    resumed = ddqn.train(s, seed=3, device=CPU, checkpoint_path=ckpt, checkpoint_interval=250)
    assert resumed["resumed_from"] == saved["step"] and resumed["steps"] == reference["steps"] == 800
    rb, ref_rb = resumed["replay_buffer"], reference["replay_buffer"]
    for field in ddqn.ReplayBuffer.FIELDS:
        np.testing.assert_array_equal(getattr(rb, field)[: saved["step"]], saved["replay_buffer"][field].numpy())
        np.testing.assert_array_equal(getattr(rb, field), getattr(ref_rb, field))
    assert resumed["curve"] == reference["curve"] and resumed["curve"]["x"] == [400, 800]
    for name, value in reference["agent"].state_dict().items():
        assert torch.equal(resumed["agent"].state_dict()[name], value), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: a checkpoint written there, resumed on the CPU and back")
@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_resumes_on_another_device(tmp_path, first, second):
    s, ckpt = settings("sk"), tmp_path / "checkpoint.pt"
    with pytest.raises(ddqn.RunInterrupted):
        ddqn.train(s, seed=1, device=torch.device(first), checkpoint_path=ckpt, checkpoint_interval=250,
                   stop_after_steps=600)
    saved = torch.load(ckpt, weights_only=True)  # no map_location: every tensor was saved on the CPU
    assert all(t.device.type == "cpu" for t in saved["agent"].values())
    out = ddqn.train(s, seed=1, device=torch.device(second), checkpoint_path=ckpt, checkpoint_interval=250)
    assert out["resumed_from"] == saved["step"] and out["steps"] == 800
    assert all(p.device.type == second for p in out["agent"].parameters())
    for field in ddqn.ReplayBuffer.FIELDS:
        np.testing.assert_array_equal(getattr(out["replay_buffer"], field)[: saved["step"]],
                                      saved["replay_buffer"][field].numpy())


# --------------------------------------------------------------------------------- runs and records
def records_in(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("**/*.json"))]


def test_runs_in_a_users_checkpoint_folder_resume_and_touch_only_their_own_file(cli, tmp_path):
    folder = tmp_path / "mine"
    (folder / "keep").mkdir(parents=True)
    (folder / "notes.txt").write_text("a user's file")
    common = ["+exp=ddqn", "profile=smoke", "logger=none", f"exp.checkpoint_dir={folder}", "exp.checkpoint_interval=100",
              "sk.head.k=8"]
    killed = cli(*common, "exp.agent=sk", "exp.stop_after_steps=250", check=False)
    assert killed.returncode != 0 and "RunInterrupted" in killed.stderr
    (own,) = folder.glob("ddqn-cartpole-sk-seed0-*.pt")

    cli("-m", *common, "exp.agent=ddqn,sk", "seed=0")
    assert (folder / "notes.txt").read_text() == "a user's file" and (folder / "keep").is_dir()
    assert not own.exists() and not list(folder.glob("*.pt"))
    by_agent = {r["rows"][0]["keys"]["agent"]: r for r in records_in(tmp_path / "results")}
    sk_row = by_agent["sk"]["rows"][0]
    assert sk_row["keys"]["sk_k"] == "8" and by_agent["sk"]["config"]["sk"]["head"]["k"] == 8  # sk.head.k=8 reached the head
    assert int(sk_row["info"]["resumed_from_step"]) >= 200    # picked up the killed run
    assert by_agent["ddqn"]["rows"][0]["info"]["resumed_from_step"] == "0"
    assert by_agent["ddqn"]["rows"][0]["keys"]["sk_k"] == "-"


def test_every_env_and_agent_trains_and_writes_a_record(cli, tmp_path):
    envs, agents = ["cartpole", "acrobot", "lunarlander", "breakout"], list(ddqn.AGENTS)
    cli("-m", "+exp=ddqn", "profile=smoke", "logger=none", f"exp.env={','.join(envs)}", f"exp.agent={','.join(agents)}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    records = records_in(tmp_path / "results")
    assert sorted((r["rows"][0]["keys"]["env"], r["rows"][0]["keys"]["agent"]) for r in records) == \
        sorted((e, a) for e in envs for a in agents)
    for rec in records:
        (row,) = rec["rows"]
        assert rec["curves"]["eval_return"]["x"] == [150, 300]
        assert row["metrics"]["final_return"] == rec["curves"]["eval_return"]["y"][-1]
        assert row["metrics"]["sec_per_step"] > 0 and row["info"]["device"] == "cpu"
        assert math.isfinite(row["metrics"]["auc"])


def test_sk_keys_that_ddqn_does_not_read_are_rejected():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for bad in ("sk.grid.k=[8]", "sk.k=8", "exp.sk_k=8", "sk.head.kk=8"):
            with pytest.raises(ConfigCompositionException):
                compose(config_name="config", overrides=["+exp=ddqn", bad])


def test_progress_bar_shows_steps_unless_silenced(monkeypatch, capsys, one_thread):
    s = settings("ddqn", total_steps=500, learning_starts=400)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("SK_NO_PROGRESS", "0")
    ddqn.train(s, seed=0, device=CPU, checkpoint_path=None, checkpoint_interval=10**6)
    assert "ddqn ddqn cartpole" in capsys.readouterr().err
    monkeypatch.setenv("SK_NO_PROGRESS", "1")
    ddqn.train(s, seed=0, device=CPU, checkpoint_path=None, checkpoint_interval=10**6)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------- tables: statistics
@pytest.fixture
def few_reps(monkeypatch):
    """Fewer bootstrap replicates than the tables use (rliable's bootstrap loops in Python)."""
    monkeypatch.setattr(ddqn, "BOOTSTRAP_REPS", 2000)
    monkeypatch.setattr(ddqn, "PROFILE_REPS", 200)


def fake_records(final: dict, sec: dict | None = None) -> list[dict]:
    """Records {(env, agent): [final return per seed]} with the envs' real references."""
    envs = {"cartpole": {"env_id": "CartPole-v1", "threshold": 475.0, "random_return": 25.0},
            "acrobot": {"env_id": "Acrobot-v1", "threshold": -100.0, "random_return": -500.0}}
    out = []
    for (env, agent), values in final.items():
        keys = ddqn.row_keys({"env": env, "agent": agent, "head": None if agent == "ddqn" else
                              {"targets": "fixed", "support_size": 256, "k": 16}})
        for seed, v in enumerate(values):
            out.append({"seed": seed, "profile": "quick", "started_utc": f"2026-01-01T00:00:{seed:02d}",
                        "config": {"exp": {"envs": envs}},
                        "rows": [{"keys": keys, "metrics": {"final_return": v, "auc": 0.5, "sec_per_step":
                                                            (sec or {}).get(agent, 1e-3)}}],
                        "curves": {"eval_return": {"x": [1, 2], "y": [0.0, v]}}})
    return out


def test_iqm_is_the_interquartile_mean():
    assert ddqn.iqm(np.array([100.0, 1.0, 3.0, 2.0, 4.0])) == pytest.approx(3.0)  # mean of 2, 3, 4
    assert ddqn.iqm(np.arange(8.0)) == pytest.approx(3.5)                        # mean of 2..5


def test_paired_differences_and_summary_rows(few_reps):
    base = [100.0, 200.0, 300.0, 400.0, 500.0]
    recs = fake_records({("cartpole", "ddqn"): base, ("cartpole", "sk"): [b + d for b, d in zip(base, [1, 2, 3, 4, 5])]},
                        sec={"ddqn": 1e-3, "sk": 1.5e-3})
    (d,) = ddqn.paired_differences(recs)
    # The seed-by-seed differences are 1..5: mean 3; the CI comes from those five, not from the spread
    # of the returns themselves (100..500), which an unpaired comparison would see.
    assert d["n"] == 5 and d["mean"] == pytest.approx(3.0) and 1.0 < d["lo"] < 3.0 < d["hi"] < 5.0
    assert d["wins"] == 5
    rows = {r["agent"]: r for r in ddqn.summarize(recs)}
    assert rows["ddqn"]["n"] == 5 and rows["ddqn"]["final return: IQM [95% CI]"].startswith("300 [")
    assert rows["ddqn"]["normalised final: mean [95% CI]"].startswith(f"{(300 - 25) / 450:.3g} [")
    notes = "\n".join(ddqn.comparisons(recs))
    assert "+3 [" in notes and "| cartpole | sk (fixed, S=256, k=16) | 1.50 | 1.50 |" in notes


def test_aggregate_across_envs_is_stratified_by_env(few_reps):
    # cartpole: normalised scores 0, 0.5, 1 (varied); acrobot: all exactly 0.5. Every bootstrap replicate keeps
    # three runs of each env, so the pooled mean moves only with cartpole's resampling: within [0.25, 0.75].
    recs = fake_records({("cartpole", "ddqn"): [25.0, 250.0, 475.0], ("acrobot", "ddqn"): [-300.0] * 3})
    (row,) = ddqn.aggregate(recs)
    est, lo, hi = row["mean"]
    assert row["runs"] == 6 and est == pytest.approx(0.5) and 0.25 <= lo < 0.5 < hi <= 0.75


def test_figures_and_notes_render(tmp_path, few_reps):
    recs = fake_records({("cartpole", "ddqn"): [300.0, 400.0, 500.0], ("cartpole", "sk"): [350.0, 420.0, 480.0],
                         ("acrobot", "ddqn"): [-120.0, -90.0, -100.0], ("acrobot", "sk"): [-110.0, -95.0, -85.0]})
    ddqn.make_figure(recs, tmp_path / "curves.png")
    ((name, draw),) = ddqn.extra_figures(recs)
    assert name == "ddqn_performance_profile_quick.png"
    draw(tmp_path / name)
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / name).stat().st_size > 10_000
    assert ddqn.extra_figures([r for r in recs if r["rows"][0]["keys"]["env"] == "cartpole"]) == []  # one env: none
    notes = "\n".join(ddqn.comparisons(recs))
    for heading in ("Normalised scores", "Across environments", "Paired differences", "Cost"):
        assert heading in notes


def test_bootstrap_cis_are_reproducible(few_reps):
    """rliable draws from numpy's global generator: the tables' CIs must not change from one build to the next."""
    from experiments.core.probes import paired_ci

    recs = fake_records({("cartpole", "ddqn"): [25.0, 250.0, 475.0, 300.0], ("acrobot", "ddqn"): [-300.0, -200.0, -120.0, -90.0]})
    diffs = np.random.default_rng(1).normal(size=5)
    np.random.seed(123)
    first = (ddqn.aggregate(recs), paired_ci(diffs))
    state = np.random.get_state()
    np.random.seed(456)
    assert (ddqn.aggregate(recs), paired_ci(diffs)) == first
    np.random.set_state(state)
    before = np.random.random()
    np.random.set_state(state)
    paired_ci(diffs)
    assert np.random.random() == before  # the caller's global state is left as it was
