"""A cell's training loop (PyTorch), shared by every family that trains by minibatches.

A family gives a :class:`Task` (tensors to train on, the probe sets, the loss and the
evaluation) and a model; this module builds the optimizer and the learning-rate schedule
of the recipe and runs the epochs, recording before each recorded epoch's updates.

Optimizers: ``adam``, ``adamw`` (decoupled weight decay), ``sgd`` (``momentum`` as given,
0 by default) and ``sgd_momentum`` (SGD with ``momentum``, 0.9 when it is 0). Schedules,
per optimizer step over the whole run of ``S`` steps: ``constant``; ``cosine``
(``lr · ½(1 + cos(π s / S))``); ``warmup`` (linear from ``lr / W`` to ``lr`` over the
first ``W = max(1, round(warmup · S))`` steps, then constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvcore.sweep.config import Cell, SweepConfig, TrainSpec

#: Momentum of ``sgd_momentum`` when ``[train] momentum`` is 0.
DEFAULT_MOMENTUM = 0.9


@dataclass
class Task:
    """What a family trains on (torch tensors) and how it is scored.

    ``loss(model, x, y)`` is the training loss of one batch (a scalar tensor);
    ``evaluate(model)`` returns the numbers recorded (``train_loss`` first, then extras
    such as ``test_loss`` and accuracies), computed without gradients in eval mode.
    """

    x_train: Any
    y_train: Any
    probe: dict[str, Any]
    loss: Callable[[Any, Any, Any], Any]
    evaluate: Callable[[Any], dict[str, float]]
    in_features: int = 0
    #: held-out samples (the probe checks read it)
    n_test: int = 0
    out_features: int = 0
    tags: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    #: what the family's ``build`` needs beside the sizes (a fixed graph, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    #: each probe set's labels or targets, where the family has them (``[probe] dynamics``
    #: measures the kernel's alignment with them)
    probe_targets: dict[str, Any] = field(default_factory=dict)


def optimizer(model: Any, recipe: TrainSpec) -> Any:
    """The recipe's optimizer over the model's trainable parameters."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    momentum = recipe.momentum
    if recipe.optimizer == "sgd_momentum" and momentum == 0:
        momentum = DEFAULT_MOMENTUM
    return torch.optim.SGD(params, lr=recipe.lr, momentum=momentum,
                           weight_decay=recipe.weight_decay)


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """The learning rate's factor at optimizer step ``step`` of ``total`` (see the module)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    if schedule == "warmup":
        w = max(1, round(warmup * total))
        return min(1.0, (step + 1) / w)
    return 1.0


def scheduler(opt: Any, recipe: TrainSpec, total_steps: int) -> Any:
    """A LambdaLR for the recipe's schedule; None for ``constant`` (nothing to step)."""
    if recipe.schedule == "constant":
        return None
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(recipe.schedule, s, total_steps, recipe.warmup))


def base_tags(config: SweepConfig, cell: Cell, recipe: TrainSpec, seed: int) -> dict[str, Any]:
    """The run's tags in its record store: the cell's values and the recipe."""
    return {**dict(cell.params), "cell": cell.id, "seed": seed, "family": config.family,
            "dataset": config.data.dataset, "loss_fn": recipe.loss, "init": recipe.init,
            "optimizer": recipe.optimizer, "lr": recipe.lr, "schedule": recipe.schedule,
            "epochs": recipe.epochs, "batch_size": recipe.batch_size,
            "weight_decay": recipe.weight_decay}


def dynamics_options(config: SweepConfig, task: Task | None = None) -> dict[str, Any]:
    """The Recorder's kernel-dynamics options for ``[probe] dynamics = true`` (none
    otherwise): motion between records, and alignment with the probe's targets where the
    family has them."""
    if not config.probe.dynamics:
        return {}
    targets = dict(task.probe_targets) if task is not None else {}
    return {"dynamics": True, "top_k": config.probe.top_k, "targets": targets or None}


def run_epochs(config: SweepConfig, cell: Cell, db: Path, model: Any, task: Task,
               recipe: TrainSpec, seed: int) -> dict[str, Any]:
    """Train ``model`` on ``task`` for the recipe's epochs, recording into ``db``.

    The batch order comes from a generator seeded with ``seed``; the model was built
    after ``torch.manual_seed(seed)``: the cell's numbers are the same on every engine.
    """
    import torch

    from cvcore.errors import InputError
    from cvcore.record import ProbeSets, Recorder

    if config.probe.subsets is not None:
        smallest = min(len(v) for v in task.probe.values())
        if config.probe.subsets[1] > smallest:
            raise InputError(f"[probe] subsets: expected subsets of at most {smallest} "
                             f"samples (the smallest probe set), got {config.probe.subsets[1]}")
    opt = optimizer(model, recipe)
    n = len(task.x_train)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    sched = scheduler(opt, recipe, recipe.epochs * steps_per_epoch)
    schedule = set(config.record.schedule(recipe.epochs))
    generator = torch.Generator().manual_seed(seed)
    tags = {**base_tags(config, cell, recipe, seed), **task.tags}
    final: dict[str, float] = {}

    def evaluate() -> dict[str, float]:
        was = model.training
        model.eval()
        with torch.no_grad():
            numbers = task.evaluate(model)
        model.train(was)
        return numbers

    with Recorder(ProbeSets(task.probe), sink=db, name=cell.id, tags=tags, seed=seed,
                  subsets=config.probe.subsets, variables=list(config.probe.variables),
                  kernel=config.probe.kernel, dtype=config.probe.dtype,
                  backend="torch", **dynamics_options(config, task)) as rec:
        for epoch in range(recipe.epochs + 1):
            if epoch in schedule:
                numbers = evaluate()
                loss = numbers.pop("train_loss")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training diverged: loss {loss} at epoch {epoch}")
                rec.record(epoch, model, loss=loss, **numbers)
                final = {"train_loss": loss, **numbers}
            if epoch == recipe.epochs:
                break
            model.train()
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, recipe.batch_size):
                index = order[start:start + recipe.batch_size]
                opt.zero_grad(set_to_none=True)
                task.loss(model, task.x_train[index], task.y_train[index]).backward()
                opt.step()
                if sched is not None:
                    sched.step()
        n_params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return {"n_params": n_params, "final": final, "store": db.name}
