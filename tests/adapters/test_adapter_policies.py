"""The RL family: PPO / A2C / DQN trained briefly, saved and reloaded with SB3's loader, and
a plain actor-critic module, against explicit per-sample autograd loops in float64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("stable_baselines3")
pytest.importorskip("gymnasium")

from cvcore.cli.app import make_app
from stable_baselines3 import A2C, DQN, PPO
from typer.testing import CliRunner

import cvcore
from cvcore.api import build_all, make_request
from cvcore.checkpoints import load_checkpoint
from cvcore.data_io import load_data
from cvcore.errors import InputError, ModelError, UntrustedFileError
from cvcore.protocols import LoadOptions
from tests.references import full_reference
from tests.tolerance import rel_error as rel


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """PPO and DQN on CartPole, A2C on Pendulum (continuous actions), a few updates each."""
    root = tmp_path_factory.mktemp("agents")
    small = {"net_arch": [16]}
    ppo = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, seed=0,
              device="cpu", policy_kwargs=small)
    ppo.learn(64)
    dqn = DQN("MlpPolicy", "CartPole-v1", learning_starts=16, buffer_size=500, train_freq=4,
              seed=0, device="cpu", policy_kwargs=small)
    dqn.learn(64)
    a2c = A2C("MlpPolicy", "Pendulum-v1", n_steps=8, seed=0, device="cpu", policy_kwargs=small)
    a2c.learn(32)
    paths = {}
    for name, agent in (("ppo", ppo), ("dqn", dqn), ("a2c", a2c)):
        paths[name] = root / f"{name}.zip"
        agent.save(paths[name])
    return paths


def reload(path: Path):
    return load_checkpoint(path, LoadOptions(trust=True)).model


@pytest.mark.parametrize("name,env", [("ppo", "CartPole-v1"), ("a2c", "Pendulum-v1")])
def test_actor_critic_gives_actor_and_critic_kernels(saved, name: str, env: str) -> None:
    agent = reload(saved[name])
    assert type(agent).__name__ == name.upper()
    obs = load_data(f"env:{env}", model=agent, samples=6, seed=0)
    assert obs.shape == (6, agent.observation_space.shape[0]) and obs.dtype == np.float32
    heads = build_all(agent, obs, request=make_request(kernel="full", dtype="float64"))
    actor_words = "actor (action logits)" if name == "ppo" else "actor (action mean)"
    assert [(h.family, h.output) for h in heads] == [("rl", actor_words), ("rl", "critic (value)")]
    policy = agent.policy.double()
    params = [p for p in policy.parameters() if p.requires_grad]
    x = torch.from_numpy(obs).double()
    ref_actor = full_reference(lambda o: policy.action_net(policy.mlp_extractor.forward_actor(o)),
                               x, params)
    ref_critic = full_reference(lambda o: policy.value_net(policy.mlp_extractor.forward_critic(o)),
                                x, params)
    assert rel(heads[0].result.kernel, ref_actor) < 1e-10
    assert rel(heads[1].result.kernel, ref_critic) < 1e-10
    # the single-kernel API gives the actor unless output= says otherwise
    assert rel(cvcore.ntk(agent, obs, kernel="full", dtype="float64", output="critic"),
               ref_critic) < 1e-10


def test_dqn_gives_the_online_q_network_kernel(saved) -> None:
    agent = reload(saved["dqn"])
    obs = load_data("env:CartPole-v1", model=agent, samples=5, seed=1)
    [head] = build_all(agent, obs, request=make_request(kernel="full", dtype="float64"))
    assert head.output == "q (Q-values)"
    q = agent.policy.q_net.double()
    params = list(q.q_net.parameters())
    assert head.result.n_params == sum(p.numel() for p in params)  # no target network
    assert head.result.n_outputs == 2
    ref = full_reference(lambda o: q.q_net(o), torch.from_numpy(obs).double(), params)
    assert rel(head.result.kernel, ref) < 1e-10
    with pytest.raises(InputError, match="expected output 'q' for a DQN agent, got 'actor'"):
        cvcore.ntk(agent, obs, output="actor")


class ActorCritic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Tanh())
        self.pi = torch.nn.Linear(12, 2)
        self.v = torch.nn.Linear(12, 1)

    def forward(self, obs):
        h = self.body(obs)
        return self.pi(h), self.v(h)


def test_plain_module_actor_critic_with_family_rl() -> None:
    torch.manual_seed(0)
    model = ActorCritic().double()
    obs = load_data("env:CartPole-v1", model=model, samples=7, seed=0, family="rl")
    assert obs.shape == (7, 4)
    heads = build_all(model, obs, request=make_request(kernel="full", dtype="float64",
                                                       family="rl"))
    assert [h.output for h in heads] == ["actor (forward output 0)", "critic (forward output 1)"]
    x = torch.from_numpy(obs).double()
    params = list(model.parameters())
    assert rel(heads[0].result.kernel, full_reference(lambda o: model(o)[0], x, params)) < 1e-10
    assert rel(heads[1].result.kernel, full_reference(lambda o: model(o)[1], x, params)) < 1e-10
    with pytest.raises(ModelError, match=r"expected a torch.nn.Module whose forward returns "
                                         r"\(logits, value\), got a forward returning Tensor"):
        cvcore.ntk(torch.nn.Linear(4, 2), obs, family="rl")


def test_rollouts_are_reproducible_and_checked(saved) -> None:
    agent = reload(saved["ppo"])
    a = load_data("env:CartPole-v1", model=agent, samples=40, seed=3)
    b = load_data("env:CartPole-v1", model=agent, samples=40, seed=3)
    c = load_data("env:CartPole-v1", model=agent, samples=40, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(InputError, match="expected a Gymnasium environment id"):
        load_data("env:NoSuchEnv-v9", model=agent, samples=4)
    with pytest.raises(InputError, match=r"observations of shape \(4,\) .*got \(3,\)"):
        load_data("env:Pendulum-v1", model=agent, samples=4)


def test_loader_needs_trust(saved) -> None:
    with pytest.raises(UntrustedFileError, match="--trust .*unpickles"):
        load_checkpoint(saved["ppo"], LoadOptions())


runner = CliRunner()


def test_cli_measures_actor_and_critic_side_by_side(saved, tmp_path: Path) -> None:
    path = str(saved["ppo"])
    args = ["measure", path, "--family", "rl", "--data", "env:CartPole-v1", "--samples", "16",
            "--seed", "0", "--dtype", "float64"]
    refused = runner.invoke(make_app(), args)
    assert refused.exit_code == 2 and refused.stdout == ""
    assert "expected --trust" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    done = runner.invoke(make_app(), [*args, "--trust", "--json"])
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert [(r["family"], r["output"]) for r in rows] == [
        ("rl", "actor (action logits)"), ("rl", "critic (value)")]
    agent = reload(saved["ppo"])
    obs = load_data("env:CartPole-v1", model=agent, samples=16, seed=0)
    for row, head in zip(rows, ("actor", "critic")):
        cv = cvcore.measure(agent, obs, output=head, dtype="float64")
        assert row["trace"] == pytest.approx(cv.trace, rel=1e-10)
        assert row["entropy"] == pytest.approx(cv.entropy, rel=1e-8)
    # observations from a file, and a table that names each row's family and output
    np.save(tmp_path / "obs.npy", obs)
    table = runner.invoke(make_app(), ["measure", path, "--trust", "--data",
                                       str(tmp_path / "obs.npy"), "--dtype", "float64"])
    assert table.exit_code == 0, table.output
    assert "critic (value)" in table.stdout and "actor (action" in table.stdout
