"""The NTK of an auto-encoder and a VAE on the bundled digits: reconstruction and latent.

A model with ``encode`` / ``decode`` is recognised as an auto-encoder; the default output
is the reconstruction, ``output="latent"`` gives the latent code's kernel, and a VAE is
measured at its posterior mean (no sampling noise). Runs in seconds on a CPU.

    python examples/autoencoder_kernel.py
"""

from __future__ import annotations

import torch

from cvcore.api import build, make_request
from cvcore.data_io import load_bundled
from cvcore.spectrum import collective_variables


class VAE(torch.nn.Module):
    """64 → 32 → (mu, logvar) in 4 dimensions → 32 → 64."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.mu, self.logvar = torch.nn.Linear(32, 4), torch.nn.Linear(32, 4)
        self.out = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 64))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def train(model: VAE, x: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        recon, mu, logvar = model(x)
        kl = -0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp())
        loss = torch.mean((recon - x) ** 2) + 1e-3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    torch.manual_seed(0)
    features, _ = load_bundled("digits")
    x = torch.from_numpy(features)
    probe = x[-64:]  # held-out digits as the probe set
    model = VAE()
    for epoch in (0, 1, 2):
        if epoch:
            train(model, x[:1024], steps=50)
        for output in ("reconstruction", "latent"):
            m = build(model, probe, request=make_request(output=output))
            cv = collective_variables(m.result.kernel)
            print(f"after {50 * epoch:>3} steps  {m.output:<32} trace={cv.trace:10.4g} "
                  f"entropy={cv.entropy:.4f}")


if __name__ == "__main__":
    main()
