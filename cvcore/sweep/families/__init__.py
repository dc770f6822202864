"""The sweep's model families: what each accepts, what data it trains on, where it lives.

Nothing here imports a framework; a family's module (``cvcore.sweep.families.<module>``)
imports PyTorch inside its functions. Each module gives ``task(config, params, recipe,
seed)`` (a :class:`cvcore.sweep.train.Task`) and ``build(params, task)`` (the model), or
``train(config, cell, db)`` when the family trains its own way (``rl``). The data of every
family ship offline; ``docs/families.md`` describes each.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "silu", "elu", "softplus", "identity")
#: Tabular datasets of the dense and conv families (or an .npz path).
TABULAR = ("digits", "iris", "diabetes", "wine")


@dataclass(frozen=True)
class FamilySpec:
    """A family's factory parameters, which of them are positive integers (with their
    largest value), the ones with a fixed set of values, its datasets and its module."""

    params: tuple[str, ...]
    ints: dict[str, int]
    choices: dict[str, tuple[object, ...]]
    datasets: tuple[str, ...]
    module: str | None = None
    #: the [train] loss when the config names none
    loss: str = "cross_entropy"

    @property
    def default_dataset(self) -> str:
        return self.datasets[0]


_SIZE = {"width": 100_000, "depth": 1_000}
FAMILY_SPECS: dict[str, FamilySpec] = {
    "dense": FamilySpec(("width", "depth", "activation", "bias"), _SIZE,
                        {"activation": ACTIVATIONS, "bias": (True, False)}, TABULAR),
    "conv": FamilySpec(("width", "depth", "activation", "kernel_size", "image_shape"),
                       {**_SIZE, "kernel_size": 99}, {"activation": ACTIVATIONS}, TABULAR),
    "vit": FamilySpec(("width", "depth", "heads", "patch"),
                      {**_SIZE, "heads": 64}, {"patch": (2, 4)}, ("digits",), "vision"),
    "transformer": FamilySpec(("width", "depth", "heads", "context"),
                              {**_SIZE, "heads": 64, "context": 512}, {}, ("text",),
                              "sequence"),
    "ssm": FamilySpec(("width", "depth", "state", "context"),
                      {**_SIZE, "state": 1024, "context": 512}, {}, ("text", "digits"),
                      "sequence"),
    "gnn": FamilySpec(("width", "depth", "conv"), _SIZE, {"conv": ("gcn", "gin")},
                      ("karate", "graphs"), "graphs"),
    "autoencoder": FamilySpec(("width", "depth", "latent", "activation"),
                              {**_SIZE, "latent": 10_000}, {"activation": ACTIVATIONS},
                              ("digits",), "autoencoders", "mse"),
    "vae": FamilySpec(("width", "depth", "latent", "activation"),
                      {**_SIZE, "latent": 10_000}, {"activation": ACTIVATIONS},
                      ("digits",), "autoencoders", "mse"),
    "rl": FamilySpec(("width", "depth", "activation", "n_steps"),
                     {**_SIZE, "n_steps": 100_000}, {"activation": ACTIVATIONS},
                     ("cartpole",), "rl"),
}
#: Every family's factory parameters (the config's check reads this).
FAMILIES: dict[str, tuple[str, ...]] = {k: v.params for k, v in FAMILY_SPECS.items()}


def family_module(family: str) -> ModuleType | None:
    """The module of a family that is not dense or conv (None for those and factories)."""
    spec = FAMILY_SPECS.get(family)
    if spec is None or spec.module is None:
        return None
    return importlib.import_module(f"cvcore.sweep.families.{spec.module}")
