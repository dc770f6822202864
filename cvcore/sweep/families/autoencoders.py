"""The ``autoencoder`` and ``vae`` families on the bundled digits (64 features in [0, 1]).

Encoder: ``depth`` × [Linear(width) → activation] → Linear(latent) (the VAE's: → Linear(2 ·
latent), the posterior's mean and log-variance); decoder: Linear(latent, width) →
activation → (``depth`` - 1) × [Linear(width) → activation] → Linear(64).

Two kernels, four probe sets: ``train`` and ``test`` measure the **reconstruction**
(64 outputs; for the VAE decoded from the posterior mean, so no sampling noise enters the
kernel), ``latent_train`` and ``latent_test`` the **latent code** (the VAE's posterior mean)
on the same images. A latent probe's rows carry one extra column (0) after the 64
features: the model returns its code for 65-column inputs and its reconstruction for
64-column ones (a shape, not a value, decides, so every NTK path differentiates the same
function; the submodules are called ``encoding`` and ``decoding``, not ``encoder`` and
``decoder``, so that cvcore's auto-encoder adapter leaves the call as it is). ``cv scaling`` analyses train and test by default; ``--probe latent_train``
the code's kernel.

Loss: the autoencoder's mean squared error; the VAE's negative ELBO per feature,
``mean((x̂ - x)²) + KL(q(z|x) ‖ N(0, I)) / 64``, with one reparameterised sample per image
from a generator seeded by the cell's seed (the recorded losses use the posterior mean).
"""

from __future__ import annotations

from typing import Any

from cvcore.errors import InputError
from cvcore.sweep.config import SweepConfig, TrainSpec
from cvcore.sweep.train import Task

FEATURES = 64
DEFAULT_LATENT = 8


def task(config: SweepConfig, params: dict[str, Any], recipe: TrainSpec, seed: int) -> Task:
    import torch

    from cvcore.sweep.data import load_split

    if recipe.loss != "mse":
        raise InputError(f"[train] loss: expected mse for the {config.family} family (a "
                         f"reconstruction), got {recipe.loss!r}")
    split = load_split(config.data)
    if split.in_features != FEATURES:
        raise InputError(f"[data] dataset: expected 64 features (digits), got "
                         f"{split.in_features}")
    x_tr, x_te = torch.from_numpy(split.x_train), torch.from_numpy(split.x_test)
    variational = config.family == "vae"
    noise = torch.Generator().manual_seed(seed + 1)

    def objective(model: Any, x: Any, sample: bool) -> Any:
        mu, logvar = model.posterior(x)
        z = mu
        if variational and sample:
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=noise)
        mse = torch.mean((model.decoding(z) - x) ** 2)
        if not variational:
            return mse
        kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1).mean()
        return mse + kl / FEATURES

    def evaluate(model: Any) -> dict[str, float]:
        return {"train_loss": float(objective(model, x_tr, False)),
                "test_loss": float(objective(model, x_te, False)),
                "train_mse": float(torch.mean((model(x_tr) - x_tr) ** 2)),
                "test_mse": float(torch.mean((model(x_te) - x_te) ** 2))}

    probe: dict[str, Any] = {}
    for name, x, n in (("train", x_tr, config.probe.train), ("test", x_te, config.probe.test)):
        if n:
            rows = x[:min(n, len(x))]
            probe[name] = rows
            probe[f"latent_{name}"] = torch.cat([rows, torch.zeros(len(rows), 1)], dim=1)
    return Task(x_tr, x_tr, probe, lambda model, x, _y: objective(model, x, True), evaluate,
                in_features=FEATURES, out_features=FEATURES, family=config.family, n_test=len(x_te),
                tags={"latent": params.get("latent", DEFAULT_LATENT)})


def build(params: dict[str, Any], task: Task) -> Any:
    import torch
    from torch import nn

    from cvcore.sweep.models import activation

    width, depth = int(params["width"]), int(params["depth"])
    latent = int(params.get("latent", DEFAULT_LATENT))
    act = params.get("activation", "relu")
    variational = task.family == "vae"

    def stack(fan_in: int, out: int) -> Any:
        layers: list[Any] = []
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), activation(act)]
            fan_in = width
        return nn.Sequential(*layers, nn.Linear(fan_in, out))

    class AutoEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoding = stack(FEATURES, 2 * latent if variational else latent)
            self.decoding = stack(latent, FEATURES)

        def posterior(self, x: Any) -> tuple[Any, Any]:
            code = self.encoding(x)
            if variational:
                mu, logvar = code.split(latent, dim=-1)
                return mu, logvar
            return code, torch.zeros_like(code)

        def forward(self, x: Any) -> Any:
            if x.shape[-1] == FEATURES + 1:  # a latent probe: the code (posterior mean)
                return self.posterior(x[..., :FEATURES])[0]
            return self.decoding(self.posterior(x)[0])

    return AutoEncoder()
