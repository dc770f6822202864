"""Reinforcement-learning policies: an actor-critic's two kernels, a Q-network's one.

Stable-Baselines3 actor-critics (PPO, A2C or their ``ActorCriticPolicy``) and plain
``torch.nn.Module`` actor-critics returning ``(logits, value)`` give two kernels, the
actor's (``output="actor"``, action logits or, for continuous actions, the action mean)
and the critic's (``output="critic"``, the value), measured separately as the paper did;
value-based agents (DQN or its ``DQNPolicy``) give the Q-network's kernel
(``output="q"``, one output per action; the target network is not measured). Inputs are
observations, batch first.
"""

from __future__ import annotations

import sys
from typing import Any

from cvcore.adapter_base import AdapterBase
from cvcore.errors import InputError, ModelError
from cvcore.protocols import OutputSelector

ACTOR, CRITIC, Q = "actor", "critic", "q"


def _preprocess(policy: Any, obs: Any) -> Any:
    """SB3's observation preprocessing (one-hot, image scaling), kept in the parameters'
    precision (SB3 casts to float32)."""
    from stable_baselines3.common.preprocessing import preprocess_obs

    dtype = next(policy.parameters()).dtype
    pre = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
    return pre.to(dtype)


def actor_critic_heads(policy: Any) -> Any:
    """A module whose ``forward(obs)`` is ``{"actor": action logits or means, "critic": value}``."""
    import torch

    class PolicyHeads(torch.nn.Module):
        cvcore_wraps = "policy"  # per-layer rows name the policy's modules (torch layers.py)

        def __init__(self) -> None:
            super().__init__()
            self.policy = policy

        def forward(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
            pre = _preprocess(self.policy, obs)
            pi_features = self.policy.pi_features_extractor(pre)
            vf_features = (pi_features if self.policy.share_features_extractor
                           else self.policy.vf_features_extractor(pre))
            latent_pi = self.policy.mlp_extractor.forward_actor(pi_features)
            latent_vf = self.policy.mlp_extractor.forward_critic(vf_features)
            return {ACTOR: self.policy.action_net(latent_pi),
                    CRITIC: self.policy.value_net(latent_vf)}

    return PolicyHeads()


def q_values(policy: Any) -> Any:
    """A module whose ``forward(obs)`` is the online Q-network's values, one per action
    (it holds ``q_net`` alone, so the target network's parameters are not measured)."""
    import torch

    class QValues(torch.nn.Module):
        cvcore_wraps = "q"  # per-layer rows name q_net's modules (torch layers.py)

        def __init__(self) -> None:
            super().__init__()
            self.q = policy.q_net

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            features = self.q.features_extractor(_preprocess(self.q, obs))
            return self.q.q_net(features)

    return QValues()


def sb3_policy(model: Any) -> tuple[Any, str] | None:
    """The policy of an SB3 algorithm or policy, and its kind (``"actor-critic"`` or
    ``"q"``); ``None`` for anything else."""
    if sys.modules.get("stable_baselines3") is None:
        return None
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.dqn.policies import DQNPolicy

    policy = getattr(model, "policy", model)
    if isinstance(policy, ActorCriticPolicy):
        return policy, "actor-critic"
    if isinstance(policy, DQNPolicy):
        return policy, "q"
    return None


def _actor_words(policy: Any) -> str:
    from stable_baselines3.common.distributions import DiagGaussianDistribution

    continuous = isinstance(policy.action_dist, DiagGaussianDistribution) or (
        type(policy.action_dist).__name__ == "StateDependentNoiseDistribution")
    return "actor (action mean)" if continuous else "actor (action logits)"


class PolicyAdapter(AdapterBase):
    """For Stable-Baselines3 agents: PPO / A2C (``ActorCriticPolicy``) give two kernels,
    ``"actor"`` and ``"critic"``; DQN (``DQNPolicy``) gives the Q-network's, ``"q"``."""

    name = "stable-baselines3"
    family = "rl"
    library = "stable_baselines3"
    extra = "adapters"
    expects = "a Stable-Baselines3 PPO, A2C or DQN agent or policy"

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("stable_baselines3") is not None

    def accepts(self, model: object) -> bool:
        return sb3_policy(model) is not None

    def heads(self, model: Any) -> tuple[str, ...]:
        found = sb3_policy(model)
        return (ACTOR, CRITIC) if found and found[1] == "actor-critic" else (Q,)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        found = sb3_policy(model)
        if found is None:
            raise ModelError(f"expected {self.expects}, got {type(model).__name__}")
        policy, kind = found
        if kind == "q":
            if output not in (None, Q):
                raise InputError(f"expected output 'q' for a DQN agent, got {output!r}")
            return q_values(policy), inputs, None
        chosen = ACTOR if output is None else output
        if chosen not in (ACTOR, CRITIC):
            raise InputError(f"expected output 'actor' or 'critic' for an actor-critic, "
                             f"got {output!r}")
        return actor_critic_heads(policy), inputs, chosen

    def describe(self, model: Any, inputs: Any, output: OutputSelector | None) -> str:
        found = sb3_policy(model)
        if found is None or found[1] == "q":
            return "q (Q-values)"
        return "critic (value)" if output == CRITIC else _actor_words(found[0])


def _first_output(model: Any, inputs: Any) -> Any:
    import torch
    from cvcore.backends.torch.setup import as_inputs, training_mode

    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    x = as_inputs(inputs, dtype, str(ref.device) if ref is not None else "cpu")[:1]
    with torch.no_grad(), training_mode(model, False):
        return model(x)


class ModuleActorCriticAdapter(AdapterBase):
    """With ``family="rl"``: a ``torch.nn.Module`` whose ``forward(obs)`` returns
    ``(logits, value)``; ``"actor"`` is output 0 and ``"critic"`` output 1. Never chosen
    from the model's type alone (any module may return a pair)."""

    name = "actor-critic-module"
    family = "rl"
    library = "torch"
    extra = "torch"
    expects = "a torch.nn.Module whose forward returns (logits, value)"

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def accepts(self, model: object) -> bool:
        return False

    def accepts_family(self, model: object) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(model, torch.nn.Module)

    def heads(self, model: Any) -> tuple[str, ...]:
        return (ACTOR, CRITIC)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        chosen = ACTOR if output is None else output
        if chosen not in (ACTOR, CRITIC):
            raise InputError(f"expected output 'actor' or 'critic' for an actor-critic, "
                             f"got {output!r}")
        raw = _first_output(model, inputs)
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
            from cvcore.outputs import output_choices

            raise ModelError(f"expected {self.expects}, got a forward returning "
                             f"{output_choices(raw)}")
        return model, inputs, 0 if chosen == ACTOR else 1

    def describe(self, model: Any, inputs: Any, output: OutputSelector | None) -> str:
        return "critic (forward output 1)" if output == CRITIC else "actor (forward output 0)"
