"""Reinforcement-learning policies (stable-baselines3 actor-critics): two heads, two kernels."""

from __future__ import annotations

import sys
from typing import Any

from cvcore.protocols import OutputSelector


def _heads(policy: Any) -> Any:
    import torch

    class PolicyHeads(torch.nn.Module):
        """``forward(obs)`` returns ``{"actor": action logits or means, "critic": value}``."""

        def __init__(self) -> None:
            super().__init__()
            self.policy = policy

        def forward(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
            from stable_baselines3.common.preprocessing import preprocess_obs

            dtype = next(self.policy.parameters()).dtype
            # SB3's preprocessing casts to float32; keep the requested precision.
            pre = preprocess_obs(obs, self.policy.observation_space,
                                 normalize_images=self.policy.normalize_images)
            pre = pre.to(dtype)
            pi_features = self.policy.pi_features_extractor(pre)
            vf_features = (pi_features if self.policy.share_features_extractor
                           else self.policy.vf_features_extractor(pre))
            latent_pi = self.policy.mlp_extractor.forward_actor(pi_features)
            latent_vf = self.policy.mlp_extractor.forward_critic(vf_features)
            return {"actor": self.policy.action_net(latent_pi),
                    "critic": self.policy.value_net(latent_vf)}

    return PolicyHeads()


class PolicyAdapter:
    """For stable-baselines3 on-policy algorithms (PPO, A2C) or their
    ``ActorCriticPolicy``: the actor's action logits (``output="actor"``, the default) and
    the critic's value (``output="critic"``) are measured as separate kernels, as the
    paper did. Inputs are observations, batch first."""

    name = "stable-baselines3"

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("stable_baselines3") is not None

    def accepts(self, model: object) -> bool:
        sb3 = sys.modules.get("stable_baselines3")
        if sb3 is None:
            return False
        from stable_baselines3.common.policies import ActorCriticPolicy

        return isinstance(getattr(model, "policy", model), ActorCriticPolicy)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        policy = getattr(model, "policy", model)
        return _heads(policy), inputs, "actor" if output is None else output
