"""The auto-encoder family: a dense auto-encoder and a small VAE, trained briefly on the
bundled digits, against explicit per-sample autograd loops in float64."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cvcore
from cvcore import plugins
from cvcore.api import build, make_request
from cvcore.data_io import load_bundled
from cvcore.errors import ModelError
from tests.references import full_reference
from tests.tolerance import rel_error as rel


class DenseAE(torch.nn.Module):
    """64 → 16 → 4 → 16 → 64, with ``encode`` and ``decode``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 4))
        self.dec = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 64))

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return self.dec(z)

    def forward(self, x):
        return self.decode(self.encode(x))


class VAE(torch.nn.Module):
    """``encoder`` gives (mu, logvar); ``forward`` samples z (so it is stochastic)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU())
        self.mu = torch.nn.Linear(16, 3)
        self.logvar = torch.nn.Linear(16, 3)
        self.decoder = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(),
                                           torch.nn.Linear(16, 64))

    def encode(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def train(model: torch.nn.Module, x: torch.Tensor, steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(x)
        if isinstance(out, tuple):
            recon, mu, logvar = out
            kl = -0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp())
            loss = torch.mean((recon - x) ** 2) + 1e-3 * kl
        else:
            loss = torch.mean((out - x) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = load_bundled("digits")
    return torch.from_numpy(x[:512]), torch.from_numpy(x[600:606]).double()


def test_dense_autoencoder_reconstruction_and_latent(digits) -> None:
    train_x, probe = digits
    torch.manual_seed(1)
    model = train(DenseAE(), train_x)
    assert plugins.select_adapter(model).family == "autoencoder"
    params = list(model.parameters())
    recon = build(model, probe, request=make_request(kernel="full", dtype="float64"))
    assert (recon.family, recon.output) == ("autoencoder", "reconstruction")
    assert recon.result.kernel.shape == (6 * 64, 6 * 64)
    assert rel(recon.result.kernel, full_reference(model, probe, params)) < 1e-10
    latent = build(model, probe, request=make_request(kernel="full", dtype="float64",
                                                      output="latent"))
    assert latent.output == "latent code"
    assert rel(latent.result.kernel, full_reference(model.encode, probe, params)) < 1e-10
    # the latent kernel sees only the encoder: it differs from the reconstruction's
    traced = cvcore.ntk(model, probe, dtype="float64")
    assert rel(traced, np.einsum("iojo->ij", recon.result.kernel.reshape(6, 64, 6, 64)) / 64) < 1e-10


def test_vae_uses_the_posterior_mean(digits) -> None:
    train_x, probe = digits
    torch.manual_seed(2)
    model = train(VAE(), train_x)
    params = list(model.parameters())
    measured = build(model, probe, request=make_request(kernel="full", dtype="float64"))
    assert measured.output == "reconstruction (posterior mean)"
    ref = full_reference(lambda x: model.decode(model.encode(x)[0]), probe, params)
    assert rel(measured.result.kernel, ref) < 1e-10
    again = cvcore.ntk(model, probe, kernel="full", dtype="float64")
    assert np.array_equal(again, measured.result.kernel)  # no sampling noise
    latent = build(model, probe, request=make_request(kernel="full", dtype="float64",
                                                      output="latent"))
    assert latent.output == "latent (posterior mean)"
    ref_latent = full_reference(lambda x: model.encode(x)[0], probe, params)
    assert rel(latent.result.kernel, ref_latent) < 1e-10
    # an explicit index measures the raw forward, which samples z in eval mode: whatever
    # output is picked, the engine cannot establish that the rows it checks on two forwards
    # belong to their samples (the draws differ), and the Jacobian path refuses the draw
    with pytest.raises(ModelError, match="draws no random numbers"):
        cvcore.ntk(model, probe, kernel="full", dtype="float64", output=1)


def test_named_family_on_a_forward_returning_reconstruction_and_latent(digits) -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 5), torch.nn.Linear(5, 64)

        def forward(self, x):
            z = torch.tanh(self.a(x))
            return self.b(z), z

    _, probe = digits
    torch.manual_seed(3)
    model = Plain().double()
    assert plugins.select_adapter(model) is None
    params = list(model.parameters())
    m = build(model, probe, request=make_request(kernel="full", dtype="float64",
                                                 family="autoencoder", output="latent"))
    assert (m.family, m.output) == ("autoencoder", "latent (forward output 1)")
    assert rel(m.result.kernel, full_reference(lambda x: model(x)[1], probe, params)) < 1e-10
    k = cvcore.ntk(model, probe, kernel="full", dtype="float64", family="autoencoder")
    assert rel(k, full_reference(lambda x: model(x)[0], probe, params)) < 1e-10


def test_stochastic_forward_without_encode_is_refused(digits) -> None:
    class Sampling(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 2), torch.nn.Linear(2, 64)

        def forward(self, x):
            z = self.a(x) + torch.randn(x.shape[0], 2, dtype=x.dtype)
            return self.b(z), z

    with pytest.raises(ModelError, match="deterministic in eval mode.*encode\\(\\) and decode"):
        cvcore.ntk(Sampling(), digits[1].float(), family="autoencoder")
