"""Kernel-augmented Double DQN (experiments/ddqn.py): targets, SK head, checkpoint resume, records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments import ddqn

ROOT = Path(__file__).resolve().parents[1]

# A CartPole run small enough for a test: training starts after 200 steps, bursts every 50 steps.
TINY = {"learning_starts": 200, "train_freq": 50, "gradient_steps": 10, "batch_size": 32, "hidden": [32, 32],
        "eval_interval": 500, "exploration_steps": 500}


def tiny_settings(agent: str, total_steps: int = 1500) -> dict:
    exp = OmegaConf.load(ROOT / "configs/exp/ddqn.yaml").exp
    exp.agent, exp.total_steps, exp.eval_episodes = agent, total_steps, 2
    exp.support_size, exp.sk_k, exp.sk_refresh_interval = 64, 8, 250
    for key, value in TINY.items():
        exp.envs.cartpole[key] = value
    return ddqn.resolve_settings(exp)


def test_double_dqn_target_hand_computed():
    rewards = torch.tensor([1.0, 0.5, 2.0])
    dones = torch.tensor([0.0, 0.0, 1.0])
    next_q_online = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 9.0]])   # argmax: 1, 0, 1
    next_q_target = torch.tensor([[5.0, 3.0], [4.0, 1.0], [7.0, 8.0]])   # max: 5, 4, 8
    gamma = 0.9
    y = ddqn.double_dqn_target(rewards, dones, next_q_online, next_q_target, gamma)
    # Q_target at the online network's choice: 3 (row 0), 4 (row 1); row 2 is terminal.
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 3.0, 0.5 + 0.9 * 4.0, 2.0]))
    y_dqn = ddqn.dqn_target(rewards, dones, next_q_target, gamma)
    assert torch.allclose(y_dqn, torch.tensor([1.0 + 0.9 * 5.0, 0.5 + 0.9 * 4.0, 2.0]))
    # They differ exactly where the two networks disagree about the best next action (row 0).
    assert (y != y_dqn).tolist() == [True, False, False]


def test_sk_head_cache_follows_the_network_and_refresh_sets_residuals():
    torch.manual_seed(0)
    qnet = ddqn.QNetwork((4,), 2, "mlp", [16, 16])
    agent = ddqn.SKQNetwork(qnet, (4,), torch.float32, 2, support_size=32, k=8, kernel="gaussian", ridge=1e-6,
                            learned_targets=False)
    obs = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(agent(obs), qnet(obs))  # no SK term before the first refresh
    target_agent = ddqn.SKQNetwork(ddqn.QNetwork((4,), 2, "mlp", [16, 16]), (4,), torch.float32, 2, 32, 8,
                                   "gaussian", 1e-6, False)
    rb = ddqn.ReplayBuffer(100, (4,), np.float32)
    rng = np.random.default_rng(0)
    for i in range(40):
        rb.add(rng.normal(size=4), i % 2, 1.0, rng.normal(size=4), i % 7 == 0)
    ddqn.refresh_support(agent, target_agent, rb, rng, 0.99, "auto", torch.device("cpu"))
    assert bool(agent.active)
    # Y holds the TD residual of the taken action and zero elsewhere.
    y = agent.sk.targets
    assert int((y != 0).sum()) <= 32 and torch.all((y != 0).sum(1) <= 1)
    # With a tiny ridge and k = 8 neighbours the augmented Q meets the bootstrap target at a support point:
    # Q(s_j, a_j) = Q_theta(s_j, a_j) + Y_j[a_j] (the point is its own nearest neighbour).
    with torch.no_grad():
        s0 = agent.support_obs[:1]
        a0 = int(y[0].abs().argmax())
        assert torch.allclose(agent(s0)[0, a0], qnet(s0)[0, a0] + y[0, a0], atol=1e-3)
    # The cached support features used without grad follow an optimiser step.
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    with torch.no_grad():
        before = agent(obs)
    agent(obs).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after_cached = agent(obs)
    assert not torch.allclose(before, after_cached)
    assert torch.allclose(after_cached, agent(obs).detach(), atol=1e-5)  # grad mode recomputes the support


@pytest.fixture
def one_thread():
    """As the runs do (threads: 1 in the overlay): far faster for these small networks on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interrupted_run_resumes_from_checkpoint(tmp_path, one_thread):
    s = tiny_settings("sk", total_steps=1000)
    cpu = torch.device("cpu")
    reference = ddqn.train(s, seed=3, device=cpu, checkpoint_path=None, checkpoint_interval=250)

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(ddqn.RunInterrupted):
        ddqn.train(s, seed=3, device=cpu, checkpoint_path=ckpt, checkpoint_interval=250, stop_after_steps=700)
    saved = torch.load(ckpt, weights_only=False)
    assert 500 <= saved["step"] < 700  # the last checkpoint: the first episode end after step 500
    saved_buffer = saved["replay_buffer"]
    assert saved_buffer["size"] == saved["step"]
    assert bool(saved["agent"]["active"])  # the SK head (support set, targets) is in the checkpoint

    resumed = ddqn.train(s, seed=3, device=cpu, checkpoint_path=ckpt, checkpoint_interval=250)
    assert resumed["resumed_from"] == saved["step"]
    assert resumed["steps"] == reference["steps"] == 1000
    rb, ref_rb = resumed["replay_buffer"], reference["replay_buffer"]
    # The buffer was kept: the transitions up to the checkpoint are the saved ones...
    for field in ddqn.ReplayBuffer.FIELDS:
        np.testing.assert_array_equal(getattr(rb, field)[: saved["step"]], saved_buffer[field].numpy())
    # ...and the resumed run repeats the uninterrupted one step for step (buffer, evaluations).
    assert rb.size == ref_rb.size == 1000
    for field in ddqn.ReplayBuffer.FIELDS:
        np.testing.assert_array_equal(getattr(rb, field)[: rb.size], getattr(ref_rb, field)[: ref_rb.size])
    assert resumed["curve"] == reference["curve"]
    assert resumed["curve"]["x"] == [500, 1000]


def test_iqm_and_stratified_bootstrap():
    assert ddqn.iqm(np.array([100.0, 1.0, 3.0, 2.0, 4.0])) == pytest.approx(3.0)  # mean of 2, 3, 4
    assert ddqn.iqm(np.arange(8.0)) == pytest.approx(3.5)  # mean of 2..5
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    est, lo, hi = ddqn.stratified_bootstrap_ci([x], ddqn._mean, reps=4000)
    assert est == pytest.approx(3.5) and 2.0 < lo < 3.5 < hi < 5.0
    # Stratified: every replicate keeps 3 runs of each task, so a task whose runs are all 10 contributes
    # exactly half of the pooled mean; the interval only reflects the spread of the other task.
    est, lo, hi = ddqn.stratified_bootstrap_ci([np.array([0.0, 1.0, 2.0]), np.full(3, 10.0)], ddqn._mean, reps=4000)
    assert est == pytest.approx(5.5) and 5.0 <= lo < 5.5 < hi <= 6.0


def _run(args, tmp_path, multirun=False):
    env = {**os.environ, "SK_NO_PROGRESS": "1"}
    cmd = [sys.executable, "experiments/run.py", *(["-m"] if multirun else []), "+exp=ddqn", "logger=none", f"paths.results={tmp_path}/results",
           f"paths.cache={tmp_path}/cache", f"hydra.run.dir={tmp_path}/out", f"hydra.sweep.dir={tmp_path}/multirun",
           "exp.total_steps=1000", "exp.eval_episodes=2", "exp.support_size=64", "exp.sk_k=8",
           "exp.sk_refresh_interval=250", "exp.checkpoint_interval=300",
           *[f"exp.envs.cartpole.{k}={v}" for k, v in TINY.items() if k != "hidden"],
           "exp.envs.cartpole.hidden=[32,32]", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_runner_writes_records_and_resumes_killed_run(tmp_path):
    killed = _run(["exp.agent=sk", "exp.stop_after_steps=700"], tmp_path)
    assert killed.returncode != 0 and "RunInterrupted" in killed.stderr
    assert list((tmp_path / "cache" / "ddqn_ckpt").glob("*/checkpoint.pt"))

    done = _run(["exp.agent=ddqn,sk", "seed=0"], tmp_path, multirun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results/runs/ddqn/quick").glob("*.json"))]
    assert len(records) == 2
    by_agent = {r["rows"][0]["keys"]["agent"]: r for r in records}
    assert set(by_agent) == {"ddqn", "sk"}
    assert by_agent["sk"]["rows"][0]["keys"] == {"env": "cartpole", "agent": "sk", "sk_targets": "fixed",
                                                  "support_size": "64", "sk_k": "8"}
    assert by_agent["ddqn"]["rows"][0]["keys"]["support_size"] == "-"
    assert int(by_agent["sk"]["rows"][0]["info"]["resumed_from_step"]) >= 600  # picked up the killed run
    assert by_agent["ddqn"]["rows"][0]["info"]["resumed_from_step"] == "0"
    for rec in records:
        m = rec["rows"][0]["metrics"]
        assert set(m) == {"final_return", "auc", "steps_to_threshold", "reached_threshold", "sec_per_step"}
        assert rec["curves"]["eval_return"]["x"] == [500, 1000]
        assert m["final_return"] == rec["curves"]["eval_return"]["y"][-1]
        assert m["sec_per_step"] > 0 and 500 <= m["steps_to_threshold"] <= 1000
    assert not list((tmp_path / "cache" / "ddqn_ckpt").glob("*/checkpoint.pt"))  # deleted on completion

    rows = ddqn.summarize(records)
    assert {r["agent"] for r in rows} == {"ddqn", "sk"}
    for r in rows:
        assert r["n_seeds"] == 1 and r["final_return_mean_lo"] <= r["final_return_mean"] <= r["final_return_mean_hi"]
    ddqn.make_figure(records, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
