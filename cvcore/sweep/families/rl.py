"""The ``rl`` family: PPO (stable-baselines3) on Gymnasium's CartPole-v1.

The policy is SB3's ``MlpPolicy`` with separate actor and critic networks of ``depth``
layers of ``width`` units (``activation``, tanh by default as in SB3). One epoch is one
PPO iteration: a roll-out of ``n_steps`` environment steps (default 128, one environment)
and SB3's update on it (10 passes, minibatches of ``[train] batch_size``). Epoch ``e`` is
recorded before iteration ``e``'s update; epoch ``epochs`` after the last.

**Kernels**: two probe sets on the same fixed observations, ``actor`` (the action logits,
2 outputs) and ``critic`` (the value, 1 output), as the paper measured them. The
observations are the first ``[probe] train`` of a roll-out of uniformly random actions in
CartPole-v1 reset with ``[data] seed`` (restarting episodes), collected once, before
training. A critic probe row carries one extra column (0): the recorded module returns
the value for 5-column inputs and the logits for 4-column ones (a shape, not a value,
decides). Both kernels are over all the policy's trainable parameters.

**Recorded beside them**: ``episode_reward``, the mean return of 3 episodes of the
deterministic policy on an evaluation environment reset with seeds 10⁶ … 10⁶ + 2 (the
same episodes' starts at every record), and the last roll-out's mean episode return
when an episode has ended (``rollout_reward``). The record's loss is the critic's on
those episodes: the mean squared difference between each visited state's value and its
discounted return (PPO's own surrogate is not comparable across iterations).

**The recipe**: ``optimizer`` adam (SB3's, eps 1e-5), adamw, sgd, sgd_momentum with
``weight_decay``; ``lr`` with the ``schedule`` over iterations; ``init`` ``default`` keeps
SB3's orthogonal initialisation, the others re-draw every Linear weight as for the other
families. ``seed`` seeds SB3 (torch, NumPy, the environment).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from cvcore.sweep.config import Cell, SweepConfig, TrainSpec

ENV = "CartPole-v1"
DEFAULT_STEPS = 128
EVAL_EPISODES = 3
EVAL_SEED = 1_000_000


def observations(count: int, seed: int) -> Any:
    """``count`` CartPole observations from uniformly random actions (seeded), float32."""
    import gymnasium as gym
    import numpy as np

    env = gym.make(ENV)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows: list[Any] = []
    while len(rows) < count:
        rows.append(obs)
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
        if terminated or truncated:
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
    env.close()
    return np.asarray(rows, dtype=np.float32)


def heads(policy: Any, obs_dim: int) -> Any:
    """The module recorded: actor logits for ``obs_dim`` columns, the value for one more."""
    from torch import nn

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = policy  # not ``policy``: cvcore's SB3 adapter would claim the module

        def forward(self, obs: Any) -> Any:
            p = self.net
            if obs.shape[-1] == obs_dim + 1:
                features = p.features_extractor(obs[..., :obs_dim])
                return p.value_net(p.mlp_extractor.forward_critic(features))
            features = p.features_extractor(obs)
            return p.action_net(p.mlp_extractor.forward_actor(features))

    return Heads()


def evaluation(model: Any) -> tuple[float, float]:
    """(mean return, critic loss) of the deterministic policy over the fixed evaluation
    episodes; the critic loss is the mean squared difference between the value of each
    visited state and its discounted return from there (γ = the agent's gamma)."""
    import gymnasium as gym
    import numpy as np
    import torch

    env = gym.make(ENV)
    total, errors = 0.0, []
    for k in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=EVAL_SEED + k)
        done, states, rewards = False, [], []
        while not done:
            states.append(obs)
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(int(action))
            rewards.append(float(reward))
            done = terminated or truncated
        returns = np.zeros(len(rewards))
        running = 0.0
        for t in range(len(rewards) - 1, -1, -1):
            running = rewards[t] + model.gamma * running
            returns[t] = running
        with torch.no_grad():
            values = model.policy.predict_values(torch.as_tensor(np.asarray(states)))
        errors.append((values.numpy().ravel() - returns) ** 2)
        total += sum(rewards)
    env.close()
    return total / EVAL_EPISODES, float(np.mean(np.concatenate(errors)))


def _optimizer(recipe: TrainSpec) -> tuple[Any, dict[str, Any]]:
    import torch

    from cvcore.sweep.train import DEFAULT_MOMENTUM

    wd = recipe.weight_decay
    if recipe.optimizer == "adam":
        return torch.optim.Adam, {"eps": 1e-5, "weight_decay": wd}
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW, {"eps": 1e-5, "weight_decay": wd}
    momentum = recipe.momentum or (DEFAULT_MOMENTUM if recipe.optimizer == "sgd_momentum"
                                   else 0.0)
    return torch.optim.SGD, {"momentum": momentum, "weight_decay": wd}


def make_agent(params: dict[str, Any], recipe: TrainSpec, seed: int) -> Any:
    """The cell's PPO agent, initialised (see the module)."""
    import torch
    from stable_baselines3 import PPO

    from cvcore.errors import InputError
    from cvcore.sweep.models import activation, initialise
    from cvcore.sweep.train import lr_factor

    width, depth = int(params["width"]), int(params["depth"])
    n_steps = int(params.get("n_steps", DEFAULT_STEPS))
    if recipe.batch_size > n_steps:
        raise InputError(f"[train] batch_size: expected at most n_steps ({n_steps}), got "
                         f"{recipe.batch_size}")
    epochs = recipe.epochs
    act = type(activation(params.get("activation", "tanh")))
    opt_class, opt_kwargs = _optimizer(recipe)

    def lr(progress_remaining: float) -> float:
        step = round((1.0 - progress_remaining) * epochs)
        return recipe.lr * lr_factor(recipe.schedule, step, epochs, recipe.warmup)

    with warnings.catch_warnings():  # SB3 warns of a last, shorter minibatch; fine here
        warnings.filterwarnings("ignore", message=".*mini-batch size.*", category=UserWarning)
        model = PPO("MlpPolicy", ENV, learning_rate=lr, n_steps=n_steps,
                    batch_size=recipe.batch_size, seed=seed, device="cpu", verbose=0,
                    policy_kwargs={"net_arch": {"pi": [width] * depth, "vf": [width] * depth},
                                   "activation_fn": act, "optimizer_class": opt_class,
                                   "optimizer_kwargs": opt_kwargs})
    torch.manual_seed(seed)
    initialise(model.policy, recipe.init)
    model.policy.optimizer = opt_class(model.policy.parameters(), lr=lr(1.0), **opt_kwargs)
    return model


def train(config: SweepConfig, cell: Cell, db: Path, params: dict[str, Any],
          recipe: TrainSpec, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    from cvcore.record import ProbeSets, Recorder
    from cvcore.sweep.train import base_tags, dynamics_options

    model = make_agent(params, recipe, seed)
    n_steps, epochs = model.n_steps, recipe.epochs
    n = max(config.probe.train, config.probe.test)
    obs = torch.from_numpy(observations(n, config.data.seed))
    probe = {"actor": obs, "critic": torch.cat([obs, torch.zeros(n, 1)], dim=1)}
    recorded = heads(model.policy, obs.shape[1])
    schedule = set(config.record.schedule(epochs))
    tags = {**base_tags(config, cell, recipe, seed), "env": ENV, "n_steps": n_steps,
            "probe_observations": "random-action roll-out"}
    final: dict[str, float] = {}

    with Recorder(ProbeSets(probe), sink=db, name=cell.id, tags=tags, seed=seed,
                  subsets=config.probe.subsets, variables=list(config.probe.variables),
                  kernel=config.probe.kernel, dtype=config.probe.dtype,
                  backend="torch", **dynamics_options(config)) as rec:

        def record(epoch: int) -> None:
            if epoch not in schedule:
                return
            reward, critic_loss = evaluation(model)
            numbers = {"episode_reward": reward}
            rewards = [e["r"] for e in model.ep_info_buffer or []]
            if rewards:
                numbers["rollout_reward"] = float(np.mean(rewards))
            model.policy.set_training_mode(False)
            rec.record(epoch, recorded, loss=critic_loss, **numbers)
            final.clear()
            final.update(train_loss=critic_loss, **numbers)

        class Record(BaseCallback):
            iteration = 0

            def _on_rollout_start(self) -> None:
                record(self.iteration)
                self.iteration += 1

            def _on_step(self) -> bool:
                return True

        if epochs:
            model.learn(total_timesteps=epochs * n_steps, callback=Record())
        record(epochs)
        n_params = int(sum(p.numel() for p in model.policy.parameters() if p.requires_grad))
    return {"n_params": n_params, "final": final, "store": db.name}
