"""Kernel-augmented Double DQN (experiments/ddqn/): targets, agents, the control, checkpoints, runs and records."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from experiments import ddqn
from experiments.ddqn import loop

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def settings(agent: str, env: str = "cartpole", total_steps: int = 800, **env_overrides) -> dict:
    """A small run: training after 200 steps, a burst every 50, a 64-point SK support refreshed every 250."""
    tiny = {"total_steps": total_steps, "learning_starts": 200, "train_freq": 50, "gradient_steps": 10,
            "batch_size": 32, "hidden": "[32,32]", "eval_interval": 400, "exploration_steps": 400, **env_overrides}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+exp=ddqn", f"exp.agent={agent}", f"exp.env={env}", "exp.eval_episodes=2", "sk.head.support_size=64",
            "sk.head.k=8", "sk.head.refresh_interval=250", *[f"exp.envs.{env}.{k}={v}" for k, v in tiny.items()]])
    return ddqn.resolve_settings(cfg.exp, cfg.sk.head)


# ------------------------------------------------------------------------------------ the algorithm
class TableQ(ddqn.Agent):
    """Q(s, ·) = table[s] for integer states 0, 1, 2."""

    def __init__(self, table):
        torch.nn.Module.__init__(self)
        self.table = torch.nn.Parameter(torch.tensor(table))

    def forward(self, obs, actions=None):
        return ddqn.at(self.table[obs.long().view(-1)], actions)


def batch(rewards, dones, next_obs, returns=None, obs=None, actions=None):
    n = len(rewards)
    return ddqn.Batch(torch.zeros(n, 1) if obs is None else obs, torch.zeros(n, dtype=torch.long) if actions is None
                      else actions, torch.tensor(rewards), next_obs, torch.tensor(dones),
                      torch.full((n,), float("nan")) if returns is None else torch.tensor(returns))


def test_double_dqn_target_hand_computed():
    rewards, dones, next_obs = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0, 1, 2])
    online = TableQ([[1.0, 2.0], [3.0, 0.0], [0.0, 9.0]])   # argmax: 1, 0, 1
    target = TableQ([[5.0, 3.0], [4.0, 1.0], [7.0, 8.0]])   # max: 5, 4, 8
    y = ddqn.double_dqn_target(rewards, dones, next_obs, online, target, 0.9)
    # Q_target at the online network's choice: 3 (row 0), 4 (row 1); row 2 is terminal.
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 3.0, 0.5 + 0.9 * 4.0, 2.0]))
    assert torch.equal(online.bootstrap_target(batch([1.0, 0.5, 2.0], [0.0, 0.0, 1.0], next_obs), target, 0.9), y)
    y_dqn = ddqn.dqn_target(rewards, dones, next_obs, target, 0.9)
    assert torch.allclose(y_dqn, torch.tensor([1.0 + 0.9 * 5.0, 0.5 + 0.9 * 4.0, 2.0]))


def test_td_update_takes_the_argmax_from_the_online_network_and_the_value_from_the_target():
    online = TableQ([[0.0, 0.0], [1.0, 2.0]])     # at s' (state 1) the online network picks action 1
    target = TableQ([[0.0, 0.0], [5.0, 3.0]])     # ... which the target network values at 3 (its own max: 5)
    b = batch([1.0], [0.0], torch.tensor([[1.0]]), obs=torch.tensor([[0.0]]), actions=torch.tensor([0]))
    loss = loop.td_update(online, target, torch.optim.SGD(online.parameters(), lr=0.0), b, gamma=0.5,
                          max_grad_norm=10.0)
    # y = 1 + 0.5 * 3 = 2.5 and Q(s, 0) = 0: Huber(2.5) = 2.5 - 0.5. Roles swapped: y = 1 + 0.5 * 1 -> 1.0;
    # plain DQN: y = 1 + 0.5 * 5 -> 3.0.
    assert float(loss) == pytest.approx(2.0)


def test_training_loop_passes_the_online_network_first_and_the_frozen_target_second(monkeypatch, one_thread):
    calls = []
    real = loop.td_update

    def spy(agent, target, optimizer, b, gamma, max_grad_norm):
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        calls.append((all(id(p) in trained for p in agent.parameters()),
                      not any(p.requires_grad for p in target.parameters()), agent is not target))
        return real(agent, target, optimizer, b, gamma, max_grad_norm)

    monkeypatch.setattr(loop, "td_update", spy)
    loop.train(settings("sk", total_steps=300), seed=0, device=CPU)
    assert len(calls) == 20 and all(all(c) for c in calls)


# The same seeds give the same runs as before the agents were split into experiments/ddqn/: recorded
# from experiments/ddqn.py at commit 821b529 (800 steps, seed 3, the settings above; breakout with a
# 2000-transition buffer and hidden [32]): the evaluation curve, the training episodes (count, summed
# return) and a hash of every action taken.
BEFORE_THE_SPLIT = {
    ("cartpole", "ddqn"): ([9.5, 9.5], 71, 794.0, "a0de91db996f2ee1"),
    ("cartpole", "sk"): ([11.5, 9.5], 66, 790.0, "0e841a49c1469154"),
    ("cartpole", "sk_episodic"): ([9.5, 9.5], 70, 795.0, "07110e7d4ece32d7"),
    ("breakout", "sk_episodic"): ([0.0, 1.0], 108, 15.0, "661afcd2b4302cad"),
}


@pytest.mark.parametrize("env, agent", list(BEFORE_THE_SPLIT))
def test_runs_repeat_the_runs_of_the_code_before_the_split(env, agent, one_thread):
    extra = {} if env == "cartpole" else {"buffer_size": 2000, "hidden": "[32]"}
    out = loop.train(settings(agent, env=env, **extra), seed=3, device=CPU)
    rb = out["replay_buffer"]
    actions = hashlib.sha256(rb.actions[: rb.size].tobytes()).hexdigest()[:16]
    assert (out["curve"]["y"], len(out["episode_returns"]), sum(out["episode_returns"]), actions) == \
        BEFORE_THE_SPLIT[(env, agent)]


# ----------------------------------------------------------------------------------------- the agents
def test_every_registered_agent_has_a_config_entry_and_back():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=ddqn"])
    assert set(cfg.exp.agents) == set(ddqn.AGENTS) and ddqn.RANDOM not in ddqn.AGENTS
    with pytest.raises(ValueError, match="registered twice"):
        ddqn.register("ddqn")(type("Again", (ddqn.Agent,), {}))


def test_a_new_agent_is_one_class_and_one_config_entry(monkeypatch, one_thread):
    @ddqn.register("ddqn_half_gamma")
    class HalfGamma(ddqn.DoubleDQN):  # a toy agent: the Double DQN target with half the discount
        def __init__(self, qnet, spaces, factor):
            super().__init__(qnet, spaces)
            self.factor = factor

        def bootstrap_target(self, b, target, gamma):
            return super().bootstrap_target(b, target, gamma * self.factor)

    try:
        s = settings("ddqn", total_steps=300)
        s.update(agent="ddqn_half_gamma", options={"factor": 0.5})
        out = loop.train(s, seed=0, device=CPU)
        assert isinstance(out["agent"], HalfGamma) and out["steps"] == 300
    finally:
        del ddqn.AGENTS["ddqn_half_gamma"]


def filled_buffer(n: int = 40, episode: int = 10, action=lambda i: i % 2) -> ddqn.ReplayBuffer:
    rb, rng = ddqn.ReplayBuffer(100, (4,), np.float32), np.random.default_rng(0)
    for i in range(n):
        rb.add(rng.normal(size=4), action(i), float(i % 3), rng.normal(size=4), (i + 1) % episode == 0)
        if (i + 1) % episode == 0:
            rb.finish_episode(0.9)
    return rb


SPACES = ddqn.Spaces((4,), torch.float32, 2)
HEAD = dict(k=8, kernel="gaussian", lengthscale="auto", ridge=1e-6, refresh_interval=100)


def test_sk_head_cache_follows_the_network_and_refresh_sets_residuals():
    torch.manual_seed(0)
    qnet = ddqn.QNetwork((4,), 2, "mlp", [16, 16])
    agent = ddqn.SKQNetwork(qnet, SPACES, support_size=32, **HEAD)
    target = ddqn.SKQNetwork(ddqn.QNetwork((4,), 2, "mlp", [16, 16]), SPACES, support_size=32, **HEAD)
    obs = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(agent(obs), qnet(obs))  # no SK term before the first refresh
    assert agent.refresh(filled_buffer(), np.random.default_rng(0), target, 0.99) == []  # fixed targets
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


def test_learned_sk_targets_are_returned_for_fresh_optimiser_moments():
    agent = ddqn.SKQNetwork(ddqn.QNetwork((4,), 2, "mlp", [16]), SPACES, targets="learned", support_size=32, **HEAD)
    assert agent.refresh(filled_buffer(), np.random.default_rng(0), agent.make_target(), 0.99) == [agent.targets]
    with pytest.raises(ValueError, match="targets must be fixed or learned"):
        ddqn.SKQNetwork(ddqn.QNetwork((4,), 2, "mlp", [16]), SPACES, targets="both", support_size=32, **HEAD)


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


def episodic_agent(mix=0.25, lengthscale=0.1):
    torch.manual_seed(0)
    qnet = ddqn.QNetwork((4,), 2, "mlp", [16, 16])
    head = {**HEAD, "k": 4, "lengthscale": lengthscale}
    return qnet, ddqn.EpisodicQNetwork(qnet, SPACES, mix=mix, memory_window=20, support_size=20, **head)


def test_episodic_memory_mixes_the_return_into_the_target_and_its_own_action_only():
    qnet, agent = episodic_agent()
    rb = filled_buffer(40, action=lambda i: 0)  # only action 0 is remembered
    assert agent.refresh(rb, np.random.default_rng(0), None, 0.9) == []
    with torch.no_grad():
        assert torch.equal(agent(agent.support_obs), qnet(agent.support_obs))  # the online network: Q_theta
    idx = rb.recent_with_returns(20, 20, np.random.default_rng(0))
    assert sorted(idx) == list(range(20, 40)) and agent.support_actions.tolist() == [0] * 20
    with torch.no_grad():
        s = agent.support_obs[:3]
        q_theta, (q, readout) = qnet(s), agent.memory_terms(s)
    m = q + agent.mix * readout
    g = torch.as_tensor(rb.returns[idx[:3]])
    # At a remembered (s_j, a_j): (1 - w) Q_theta + w G_j (a small ridge interpolates the memory) ...
    assert torch.equal(q, q_theta) and torch.allclose(m[:, 0], 0.75 * q_theta[:, 0] + 0.25 * g, atol=1e-3)
    # ... and action 1, of which there is no memory, keeps the network's value (its neighbours are memories
    # of action 0, at least 2 sqrt(2) away in the state-action embedding).
    assert torch.allclose(m[:, 1], q_theta[:, 1], atol=1e-6)


def test_design_1_in_the_target_bootstraps_from_the_remembered_transitions_own_target():
    torch.manual_seed(0)
    agent = ddqn.AGENTS["sk_td"](ddqn.QNetwork((4,), 2, "mlp", [16, 16]), SPACES, support_size=32, **HEAD)
    rb, gamma = filled_buffer(), 0.9
    assert agent.refresh(rb, np.random.default_rng(0), agent.make_target(), gamma) == []
    target = agent.make_target()                        # receives the support set and its residuals Y
    s = agent.support_obs[:6]
    with torch.no_grad():
        assert torch.equal(agent(s), agent.qnet(s))    # the online agent acts and learns without the memory
        a_star = agent(s).argmax(dim=1)
        y_j = agent.qnet(s) + agent.targets[:6]         # each support transition's own bootstrap target (taken action)
        b = ddqn.Batch(s, a_star, torch.ones(6), s, torch.zeros(6), torch.full((6,), float("nan")))
        y = agent.bootstrap_target(b, target, gamma)
    # At a remembered s' (tiny ridge), the bootstrap value is Q + Y: that transition's own target where a* is
    # its action, the network's value elsewhere (Y is zero for the actions not taken).
    assert torch.allclose(y, 1.0 + gamma * y_j.gather(1, a_star[:, None]).squeeze(1), atol=1e-3)


# ------------------------------------------------------------------------------------- the control
def test_control_mixes_the_return_of_ended_episodes_only():
    mc = ddqn.DoubleDQNMC(ddqn.QNetwork((1,), 2, "mlp", [8]), ddqn.Spaces((1,), torch.float32, 2), mix=0.25)
    online, target = TableQ([[1.0, 2.0], [3.0, 0.0]]), TableQ([[5.0, 3.0], [4.0, 1.0]])
    mc.forward = online.forward  # the control's Q-function is Double DQN's: only its target differs
    b = batch([1.0, 0.5, 2.0], [0.0, 0.0, 1.0], torch.tensor([0, 1, 0]), returns=[10.0, float("nan"), 2.0])
    y_ddqn = ddqn.double_dqn_target(b.rewards, b.dones, b.next_obs, online, target, 0.9)
    y = mc.bootstrap_target(b, target, 0.9)
    # Ended (G = 10): (1 - w) y + w G; not ended: Double DQN's; terminal (G = r): r either way.
    assert torch.allclose(y, torch.stack([0.75 * y_ddqn[0] + 0.25 * 10.0, y_ddqn[1], torch.tensor(2.0)]))
    with pytest.raises(ValueError, match="mix must be in"):
        ddqn.DoubleDQNMC(ddqn.QNetwork((1,), 2, "mlp", [8]), ddqn.Spaces((1,), torch.float32, 2), mix=1.0)


def test_control_target_is_design_2s_with_the_memory_readout_replaced_by_the_transitions_own_return():
    """The exact relation: y_control = mixed_target(r, done, Q_target(s', a*), G' - Q_target(s', a*), w, γ),
    G' = (G - r) / γ the return observed from s'; design 2's target is the same with c = its memory's readout."""
    gamma, rb = 0.9, filled_buffer(40, action=lambda i: i % 2)
    _, design2 = episodic_agent(mix=0.3)
    assert design2.refresh(rb, np.random.default_rng(0), None, gamma) == []
    target = design2.make_target()
    control = ddqn.DoubleDQNMC(design2.qnet, SPACES, mix=0.3)  # the same network: only the readout differs
    b = rb.batch(np.arange(0, 40, 3), CPU)
    with torch.no_grad():
        a_star = design2(b.next_obs).argmax(dim=1)
        q_next = target.qnet(b.next_obs, a_star)
        own = (b.returns - b.rewards) / gamma - q_next       # the transition's own G' - Q_target(s', a*)
        target.memory_terms = lambda obs, actions: (target.qnet(obs, actions), own)
        y_design2 = design2.bootstrap_target(b, target, gamma)
        y_control = control.bootstrap_target(b, target.qnet, gamma)
    assert torch.allclose(y_design2, y_control, atol=1e-5)
    assert not torch.allclose(y_control, ddqn.double_dqn_target(b.rewards, b.dones, b.next_obs, control,
                                                                 target.qnet, gamma))


# -------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("agent", ["sk", "sk_td", "sk_episodic", "ddqn_mc"])
def test_interrupted_run_resumes_from_checkpoint(tmp_path, one_thread, agent):
    s = settings(agent)
    reference = loop.train(s, seed=3, device=CPU)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(ddqn.RunInterrupted):
        loop.train(s, seed=3, device=CPU, checkpoint=ddqn.Checkpointer(ckpt, 250), stop_after_steps=600)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 500 <= saved["step"] < 600 and saved["replay_buffer"]["size"] == saved["step"]
    if agent != "ddqn_mc":
        assert bool(saved["agent"]["active"])  # the SK head (support set, targets) is in the checkpoint

    resumed = loop.train(s, seed=3, device=CPU, checkpoint=ddqn.Checkpointer(ckpt, 250))
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
        loop.train(s, seed=1, device=torch.device(first), checkpoint=ddqn.Checkpointer(ckpt, 250), stop_after_steps=600)
    saved = torch.load(ckpt, weights_only=True)  # no map_location: every tensor was saved on the CPU
    assert all(t.device.type == "cpu" for t in saved["agent"].values())
    out = loop.train(s, seed=1, device=torch.device(second), checkpoint=ddqn.Checkpointer(ckpt, 250))
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
    assert {a: r["rows"][0]["keys"] for a, r in by_agent.items()} == {a: {"env": "cartpole", "agent": a} for a in by_agent}
    assert by_agent["sk"]["config"]["sk"]["head"]["k"] == 8    # sk.head.k=8 reached the head
    assert int(by_agent["sk"]["rows"][0]["info"]["resumed_from_step"]) >= 200    # picked up the killed run
    assert by_agent["ddqn"]["rows"][0]["info"]["resumed_from_step"] == "0"
    for rec in by_agent.values():  # the load average at the start and end of the run, for the report's flag
        assert {"load_1min_start", "load_1min_end"} <= set(rec["summary"])


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
        assert row["metrics"]["curve_mean"] == pytest.approx(np.mean(rec["curves"]["eval_return"]["y"]))
        assert row["metrics"]["sec_per_step"] > 0 and row["info"]["device"] == "cpu"
        assert math.isfinite(float(row["info"]["threshold"]))


def test_random_policy_is_measured_and_recorded(cli, tmp_path):
    cli("-m", "+exp=ddqn", "profile=smoke", "logger=none", "exp.agent=random", "exp.env=cartpole,acrobot",
        "exp.random_episodes=4", "seed=0")
    by_env = {r["rows"][0]["keys"]["env"]: r["rows"][0] for r in records_in(tmp_path / "results")}
    assert set(by_env) == {"cartpole", "acrobot"} and all(r["keys"]["agent"] == "random" for r in by_env.values())
    # The same episodes, measured here: the uniform random policy on the evaluation's episode seeds.
    expected = loop.evaluate(None, "CartPole-v1", 4, 1_000_000, epsilon=1.0)
    assert by_env["cartpole"]["metrics"]["final_return"] == pytest.approx(np.mean(expected))
    assert by_env["cartpole"]["info"]["episodes"] == "4" and float(by_env["cartpole"]["info"]["threshold"]) == 475.0
    assert 9.0 < by_env["cartpole"]["metrics"]["final_return"] < 60.0   # falls within a few dozen steps
    assert by_env["acrobot"]["metrics"]["final_return"] == -500.0        # never swings up: every episode times out


def test_keys_the_chosen_agent_does_not_read_are_rejected():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for bad in ("sk.grid.k=[8]", "sk.k=8", "exp.sk_k=8", "sk.head.kk=8", "sk.head.mix=0.5", "exp.agents.sk.mix=0.5"):
            with pytest.raises(ConfigCompositionException):
                compose(config_name="config", overrides=["+exp=ddqn", bad])
        cfg = compose(config_name="config", overrides=["+exp=ddqn", "exp.agent=nobody"])
    with pytest.raises(ValueError, match="exp.agent must be random or one of ddqn, ddqn_mc, sk, sk_episodic"):
        ddqn.resolve_settings(cfg.exp, cfg.sk.head)


def test_settings_read_only_the_agents_own_entry_and_the_head_it_uses():
    s = settings("ddqn_mc")
    assert s["options"] == {"mix": 0.5} and s["threshold"] == 475.0  # gymnasium's reward_threshold
    assert set(settings("sk")["options"]) == {"targets", "support_grad", "support_size", "k", "kernel", "lengthscale",
                                              "ridge", "refresh_interval"}
    lr = settings("ddqn")["learning_rate"]
    assert settings("ddqn", learning_rate=0.002)["learning_rate"] == pytest.approx(0.002) and lr == pytest.approx(1e-3)


def test_progress_bar_shows_steps_unless_silenced(monkeypatch, capsys, one_thread):
    s = settings("ddqn", total_steps=500, learning_starts=400)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("SK_NO_PROGRESS", "0")
    loop.train(s, seed=0, device=CPU)
    assert "ddqn ddqn cartpole" in capsys.readouterr().err
    monkeypatch.setenv("SK_NO_PROGRESS", "1")
    loop.train(s, seed=0, device=CPU)
    assert capsys.readouterr().err == ""
