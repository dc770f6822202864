"""Sizes of the families that are not dense or conv, for the sweep's cost model.

A cell's parameter count comes from building its model on PyTorch's ``meta`` device (no
memory, no arithmetic); its forward pass costs about ``parameters × positions``
multiply-adds per sample, where ``positions`` is how many tokens, patches, steps or
nodes each weight is applied to. PPO (``rl``) is costed by its environment steps and
updates instead (:func:`rl_seconds`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from cvcore.sweep.config import SweepConfig, TrainSpec


@dataclass(frozen=True)
class Shape:
    """What the cost model and the probe checks need of a cell's data."""

    n_train: int
    n_test: int
    in_features: int
    out_features: int
    classes: int


#: Fixed seconds per optimizer step of each family (Python and framework overhead, on
#: top of the arithmetic): measured on the quick configs (``docs/families.md``).
STEP_SECONDS = {"vit": 2.5e-3, "transformer": 3e-3, "ssm": 3e-3, "gnn": 5e-4,
                "autoencoder": 6e-4, "vae": 8e-4}
#: Fixed seconds per cell where a family's differ from the dense fit (the karate graph's
#: cells are a fraction of a second).
CELL_SECONDS = {"gnn": 0.1}
#: How much slower than :data:`budget.FLOPS_PER_SECOND` a family's kernels are per
#: multiply-add of their Jacobian (fitted to the studies, ``docs/families.md``; the
#: auto-encoders' count their two latent probe sets too).
KERNEL_FACTOR = {"autoencoder": 8.0, "vae": 8.0, "vit": 4.0, "transformer": 160.0, "ssm": 1000.0,
                 "gnn": 1.0}
#: PPO: seconds per environment step, per minibatch update, per evaluation record.
RL_ENV_STEP, RL_UPDATE, RL_RECORD = 3e-4, 1.2e-3, 0.2


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


_CACHE: dict[tuple[str, str], tuple[Shape, int, int]] = {}


def _task_and_size(config: SweepConfig, key: str) -> tuple[Shape, int, int]:
    """(shape, parameters, positions) of a module family's cell with these parameters
    (cached: a grid builds each distinct model once)."""
    cache_key = (repr(config), key)
    if cache_key not in _CACHE:
        if len(_CACHE) > 1024:
            _CACHE.clear()
        _CACHE[cache_key] = _measure(config, key)
    return _CACHE[cache_key]


def _measure(config: SweepConfig, key: str) -> tuple[Shape, int, int]:
    import torch

    from cvcore.sweep.families import family_module

    params = json.loads(key)
    module = family_module(config.family)
    assert module is not None
    if config.family == "rl":
        from cvcore.sweep.families.rl import DEFAULT_STEPS

        w, d = int(params["width"]), int(params["depth"])
        hidden = (d - 1) * (w * w + w)
        count = 2 * (4 * w + w + hidden) + (w * 2 + 2) + (w + 1)
        return Shape(int(params.get("n_steps", DEFAULT_STEPS)), 0, 4, 2, 2), count, 1
    task = module.task(config, params, TrainSpec(loss=config.train.loss), 0)
    with torch.device("meta"):
        model = module.build(params, task)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    positions = {"vit": (8 // int(params.get("patch", 4))) ** 2, "autoencoder": 1, "vae": 1}
    if config.family in positions:
        pos = positions[config.family]
    elif config.family == "gnn":
        pos = 34 if config.data.dataset == "karate" else 16
    else:
        pos = 8 if config.data.dataset == "digits" else task.in_features
    classes = 0 if config.family in ("autoencoder", "vae") else task.out_features
    shape = Shape(len(task.x_train), task.n_test, task.in_features, task.out_features,
                  classes)
    return shape, count, pos


def shape(config: SweepConfig, params: dict[str, Any]) -> Shape:
    return _task_and_size(config, _key(params))[0]


def size(config: SweepConfig, params: dict[str, Any]) -> tuple[float, float]:
    """(parameters, multiply-adds per sample of one forward pass)."""
    _, count, pos = _task_and_size(config, _key(params))
    return float(count), float(count * pos)


def rl_seconds(config: SweepConfig, params: dict[str, Any], recipe: TrainSpec,
               records: int, flops_per_second: float) -> float:
    """PPO's estimated CPU seconds: env steps, minibatch updates (10 passes per
    iteration), evaluation episodes and kernels per record."""
    from cvcore.sweep.families.rl import DEFAULT_STEPS

    n_steps = int(params.get("n_steps", DEFAULT_STEPS))
    count, _ = size(config, params)
    steps = recipe.epochs * n_steps
    updates = recipe.epochs * 10 * math.ceil(n_steps / recipe.batch_size)
    n = max(config.probe.train, config.probe.test)
    kernel = 2 * (4 * count * n * 2 + 4 * n ** 3)
    return (steps * RL_ENV_STEP + updates * RL_UPDATE + records * RL_RECORD
            + (6 * count * steps * 10 + records * kernel) / flops_per_second)
