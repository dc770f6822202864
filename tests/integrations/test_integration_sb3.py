"""The Stable-Baselines3 callback: a real short PPO run on CartPole, the actor's and the
critic's kernels as two runs of one store, on fixed observations and on observations from
the rollout buffer, against a direct ``cvcore.measure`` of each head; training unchanged."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import cvcore

torch = pytest.importorskip("torch")
sb3 = pytest.importorskip("stable_baselines3")

from cvcore.integrations.sb3 import RecorderCallback, rollout_observations
from tests.integration_cli import report_and_plot

OBS = np.random.default_rng(3).normal(scale=0.1, size=(6, 4)).astype(np.float32)
VARS = ["entropy", "trace"]


def learn(callback=None, log_dir=None):
    agent = sb3.PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, n_epochs=2,
                    seed=0, device="cpu", policy_kwargs={"net_arch": [16]})
    if log_dir is not None:
        from stable_baselines3.common.logger import configure

        agent.set_logger(configure(str(log_dir), ["csv"]))
    agent.learn(96, callback=callback)  # 3 rollouts, 3 updates
    return agent


def head_values(run):
    return {(r["step"], v["variable"]): v["value"] for r in run["records"] for v in r["values"]}


def test_fixed_observations_both_heads(tmp_path):
    cb = RecorderCallback(OBS, sink=tmp_path / "ppo.db", name="ppo", variables=VARS)
    agent = learn(cb, log_dir=tmp_path / "sb3")
    plain = learn()
    for a, b in zip(agent.policy.parameters(), plain.policy.parameters()):
        assert torch.equal(a, b)
    runs = {r["name"]: r for r in cvcore.read_runs(tmp_path / "ppo.db")}
    assert sorted(runs) == ["ppo actor", "ppo critic"]
    for head in ("actor", "critic"):
        run = runs[f"ppo {head}"]
        assert run["tags"]["head"] == head
        assert [r["step"] for r in run["records"]] == [0, 1, 2, 3]
        assert [r["extras"]["timesteps"] for r in run["records"]] == [32, 64, 96, 96]
        direct = cvcore.measure(agent, OBS, variables=VARS, output=head)
        got = head_values(run)
        assert got[(3, "trace")] == pytest.approx(direct.trace, rel=1e-12)
        assert got[(3, "entropy")] == pytest.approx(direct.entropy, rel=1e-12)
    assert head_values(runs["ppo actor"])[(3, "trace")] != head_values(runs["ppo critic"])[
        (3, "trace")]
    with open(tmp_path / "sb3" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["cv/critic/probe/trace"]) for r in rows if r["cv/critic/probe/trace"]]
    assert logged == pytest.approx([head_values(runs["ppo critic"])[(s, "trace")]
                                    for s in range(4)], rel=1e-6)
    reports = report_and_plot(tmp_path / "ppo.db", tmp_path)
    assert [r["run_name"] for r in reports] == ["ppo actor", "ppo critic"]


def test_rollout_buffer_observations():
    cb = RecorderCallback(rollout=8, variables=["trace"], seed=4)
    agent = learn(cb)
    records = cb.recorders["critic"].store.records(cb.recorders["critic"].run_id)
    assert [r.step for r in records] == [0, 1, 2, 3]
    rng = np.random.default_rng(4)  # replay the callback's four draws; the last one (the
    for _ in range(4):              # final record) came from the buffer as it is now
        obs = rollout_observations(agent.rollout_buffer, 8, rng)
    for head in ("actor", "critic"):
        rec = cb.recorders[head]
        direct = cvcore.measure(agent, obs, variables=["trace"], output=head)
        assert rec.store.records(rec.run_id)[-1].get("trace") == pytest.approx(direct.trace,
                                                                                rel=1e-12)
    assert cb.recorders["critic"].store.run(cb.recorders["critic"].run_id).probe_sets == {
        "rollout": {"n_samples": 8, "subsets": None, "classes": None}}
    every2 = RecorderCallback(rollout=8, every=2, variables=["trace"], seed=4)
    learn(every2)
    rec = every2.recorders["critic"]
    again = rec.store.records(rec.run_id)
    assert [r.step for r in again] == [0, 2]
    assert again[0].get("trace") == pytest.approx(records[0].get("trace"), rel=1e-12)


def test_bad_arguments_are_one_line():
    with pytest.raises(cvcore.errors.InputError, match="fixed observations or rollout=n"):
        RecorderCallback()
    with pytest.raises(cvcore.errors.InputError, match="heads among"):
        RecorderCallback(OBS, heads=("policy",))
    with pytest.raises(cvcore.errors.InputError, match="no subsets="):
        RecorderCallback(rollout=4, subsets=(2, 2))
    with pytest.raises(cvcore.errors.InputError, match="at most 6"):
        RecorderCallback(OBS, subsets=(2, 7))  # checked when made, not when learn starts


def test_training_signals_match_sb3s_own_log(tmp_path):
    cb = RecorderCallback(OBS, sink=tmp_path / "ppo.db", name="ppo", variables=["trace"])
    learn(cb, log_dir=tmp_path / "sb3")
    with open(tmp_path / "sb3" / "progress.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["cv/actor/probe/trace"]]
    (run,) = [r for r in cvcore.read_runs(tmp_path / "ppo.db") if r["name"] == "ppo actor"]
    records = run["records"]
    assert len(rows) == len(records) == 4
    assert records[0]["loss"] is None  # before any update
    for row, record in zip(rows, records):  # one dump per record, the same logger values
        if row["train/loss"]:
            assert record["loss"] == pytest.approx(float(row["train/loss"]), rel=1e-6)
            assert record["extras"]["value_loss"] == pytest.approx(float(row["train/value_loss"]),
                                                                   rel=1e-6)
            assert "policy_gradient_loss" in record["extras"]
        if row.get("rollout/ep_rew_mean"):
            assert record["extras"]["episode_reward"] == pytest.approx(
                float(row["rollout/ep_rew_mean"]), rel=1e-6)
    assert all(r["loss"] is not None for r in records[1:])
    assert "episode_reward" in records[-1]["extras"]


def dqn():
    return sb3.DQN("MlpPolicy", "CartPole-v1", learning_starts=0, train_freq=16,
                   batch_size=8, seed=0, device="cpu", policy_kwargs={"net_arch": [16]})


def test_dqn_records_its_q_network(tmp_path):
    agent = dqn()
    cb = RecorderCallback(OBS, sink=tmp_path / "dqn.db", name="dqn", variables=VARS)
    agent.learn(64, callback=cb)
    (run,) = cvcore.read_runs(tmp_path / "dqn.db")
    assert run["name"] == "dqn q" and run["tags"]["head"] == "q"
    assert [r["step"] for r in run["records"]] == [0, 1, 2, 3, 4]
    direct = cvcore.measure(agent, OBS, variables=VARS, output="q")
    got = head_values(run)
    assert got[(4, "trace")] == pytest.approx(direct.trace, rel=1e-12)
    assert got[(4, "entropy")] == pytest.approx(direct.entropy, rel=1e-12)
    assert run["records"][-1]["loss"] is not None  # DQN's train/loss


def test_heads_that_do_not_fit_the_agent_fail_before_training():
    for callback, words in ((RecorderCallback(OBS, heads=("actor",)), "heads among \\['q'\\]"),
                            (RecorderCallback(rollout=4), "replay buffer")):
        agent = dqn()
        with pytest.raises(cvcore.errors.InputError, match=words):
            agent.learn(64, callback=callback)
        assert agent.num_timesteps == 0


def test_graph_probe_is_refused_at_construction():
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    graph = Data(x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(cvcore.errors.InputError, match="not graph networks"):
        RecorderCallback(graph)
