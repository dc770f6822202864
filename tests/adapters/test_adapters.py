"""Adapters for model families, each against explicit per-sample, per-output gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import cvcore
from cvcore import plugins
from tests.references import autograd_kernel as reference
from tests.tolerance import rel_error as rel


def test_huggingface_sequence_classifier_logits() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(0, 40, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    assert plugins.select_adapter(model).name == "huggingface"
    k = cvcore.ntk(model, {"input_ids": ids, "attention_mask": mask}, kernel="full",
                   dtype="float64")
    params = [p for p in model.parameters() if p.requires_grad]
    ref = reference(lambda i: model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits,
                    4, params)
    assert k.shape == (12, 12)
    assert rel(k, ref) < 1e-10


def test_graph_network_nodes_are_the_samples() -> None:
    pytest.importorskip("torch_geometric")
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn.models import GCN

    data = KarateClub()[0]
    torch.manual_seed(1)
    model = GCN(in_channels=data.num_features, hidden_channels=8, num_layers=2,
                out_channels=4).double().eval()
    nodes = torch.tensor([0, 5, 11, 33])
    k = cvcore.ntk(model, (data, nodes), kernel="full", dtype="float64")
    params = list(model.parameters())
    x = data.x.double()
    ref = reference(lambda i: model(x, data.edge_index)[nodes[i]], 4, params)
    assert k.shape == (16, 16)
    assert rel(k, ref) < 1e-10
    whole = cvcore.ntk(model, data, dtype="float64")
    assert whole.shape == (34, 34)


def test_actor_critic_policy_two_kernels() -> None:
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO

    agent = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu")
    policy = agent.policy.double()
    obs = torch.randn(5, 4).double()  # SB3 preprocessing rounds observations to float32
    actor = cvcore.ntk(agent, obs, kernel="full", dtype="float64")
    critic = cvcore.ntk(agent, obs, kernel="full", dtype="float64", output="critic")
    params = [p for p in policy.parameters() if p.requires_grad]
    ref_critic = reference(
        lambda i: policy.value_net(policy.mlp_extractor.forward_critic(obs[i:i + 1])), 5, params)
    ref_actor = reference(
        lambda i: policy.action_net(policy.mlp_extractor.forward_actor(obs[i:i + 1])), 5, params)
    assert actor.shape == (10, 10) and critic.shape == (5, 5)
    assert rel(critic, ref_critic) < 1e-10
    assert rel(actor, ref_actor) < 1e-10


def test_auto_encoder_needs_only_output_selection() -> None:
    class AutoEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.Linear(6, 2)
            self.dec = torch.nn.Linear(2, 6)

        def forward(self, x):
            z = torch.tanh(self.enc(x))
            return self.dec(z), z

    torch.manual_seed(2)
    model = AutoEncoder().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    params = list(model.parameters())
    for index in (0, 1):
        k = cvcore.ntk(model, x, kernel="full", dtype="float64", output=index)
        assert rel(k, reference(lambda i, index=index: model(x[i:i + 1])[index], 4, params)) < 1e-10
