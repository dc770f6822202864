"""The structured torch NTK and the kernel diagonal against two independent references.

Every implementation (auto, structured, jacobian) must give the same kernel, in float64
to a relative 1e-10, as the Jacobian path and as a plain loop of
``torch.autograd.grad`` calls, one per sample and output, on an unmodified copy of the
model. Models are built to exercise each layer rule and each fallback.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from cvcore.backends.torch.backend import TorchBackend
from cvcore.backends.torch.setup import as_inputs
from cvcore.backends.torch.setup import prepare_model as prepare
from cvcore.backends.torch.structured import structured_kernel

from cvcore.protocols import Implementation, KernelRequest
from tests.tolerance import rel_error

RTOL = 1e-10


# ---------------------------------------------------------------------------- reference
def reference_jacobian(model: Any, x: Any) -> np.ndarray:
    """``J`` (N, O, P) by one ``autograd.grad`` per sample and output, float64, eval mode."""
    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.double() if x.is_floating_point() else x
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per_output = []
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                         for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows).detach().numpy()


def reference_kernel(model: Any, x: Any, kernel: str) -> np.ndarray:
    j = reference_jacobian(model, x)
    n, n_out, p = j.shape
    if kernel == "traced":
        return np.einsum("iop,jop->ij", j, j) / n_out
    flat = j.reshape(n * n_out, p)
    return flat @ flat.T


def backend_kernel(model: Any, x: Any, kernel: str, implementation: str,
                   budget: int = 1 << 30) -> np.ndarray:
    request = KernelRequest(kernel=kernel, dtype="float64", memory_budget=budget,
                            implementation=Implementation(implementation))
    return TorchBackend().ntk(model, x, request).kernel


rel = partial(rel_error, floor=1e-300)


def uses_rules(model: Any, x: Any) -> bool:
    """Whether the structured path handles the model (it did not hand back ``None``)."""
    request = KernelRequest(dtype="float64", implementation=Implementation.STRUCTURED)
    prep = prepare(model, torch.float64, "cpu")
    return structured_kernel(prep, as_inputs(x, torch.float64, "cpu"), request, 1) is not None


# ---------------------------------------------------------------------------- models
class Scaled(nn.Module):
    """An unknown layer: a raw parameter multiplied in (no rule: Jacobian path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Any) -> Any:
        return torch.tanh(x * self.scale)


class Shared(nn.Module):
    """One Linear applied twice, plus a transposed use of another weight."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Any) -> Any:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))  # shared weights
        return self.out(h) + h[:, :3] @ self.out.weight[:, :3].t()  # untracked use


class TokenModel(nn.Module):
    """Embedding with padding, LayerNorm, GELU MLP on tokens, mean pooling."""

    def __init__(self, vocab: int = 13, d: int = 6, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.tied = tied
        self.head = nn.Linear(d, 3)

    def forward(self, t: Any) -> Any:
        h = self.norm(self.emb(t))
        h = h + F.gelu(self.fc(h))
        if self.tied:  # the embedding matrix reused as an output projection
            return F.linear(h, self.emb.weight)[:, :, :4].mean(1)
        return self.head(h).mean(1)


class TorchBlock(nn.Module):
    """A pre-norm transformer block with nn.MultiheadAttention, on float inputs."""

    def __init__(self, d: int = 8, heads: int = 2, n_out: int = 3, mask: bool = False) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, n_out)
        self.mask = mask

    def forward(self, x: Any) -> Any:
        h = self.n1(x)
        causal = None
        if self.mask:
            length = x.shape[1]
            causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        x = x + self.mlp(self.n2(x))
        return self.head(x[:, 0])


class HandBlock(nn.Module):
    """Hand-written single-head attention with nn.Linear projections and RMSNorm."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Any) -> Any:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.head((x + self.proj(att @ v)).mean(1))


def _bn(module: Any) -> Any:
    g = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
    return module


def _frozen() -> Any:
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 2))
    m[2].weight.requires_grad_(False)
    m[4].bias.requires_grad_(False)
    return m


def _cnn() -> Any:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 2, stride=2, padding="valid", groups=2),
                         nn.BatchNorm2d(4), nn.Tanh(),
                         nn.Conv2d(4, 3, 2, padding="same", dilation=2, padding_mode="circular"),
                         nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(48, 3))


def _conv1d() -> Any:
    return nn.Sequential(nn.Conv1d(3, 4, 4, padding="same", dilation=2), nn.GELU(),
                         nn.BatchNorm1d(4), nn.Conv1d(4, 2, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(10, 2))


def _mixed() -> Any:
    return nn.Sequential(nn.Linear(4, 5), Scaled(5), nn.LayerNorm(5), nn.Linear(5, 3))


def _gen(seed: int) -> Any:
    return torch.Generator().manual_seed(seed)


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
            lambda: torch.randn(6, 5, generator=_gen(1))),
    "cnn": (_cnn, lambda: torch.randn(5, 2, 8, 8, generator=_gen(2))),
    "conv1d": (_conv1d, lambda: torch.randn(4, 3, 10, generator=_gen(3))),
    "layernorm_gelu": (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(),
                                             nn.Linear(6, 2)),
                       lambda: torch.randn(5, 4, generator=_gen(4))),
    "embedding": (TokenModel, lambda: torch.randint(0, 13, (5, 4), generator=_gen(5))),
    "tied_embedding": (lambda: TokenModel(tied=True),
                       lambda: torch.randint(0, 13, (4, 3), generator=_gen(6))),
    "transformer_mha": (lambda: TorchBlock(mask=True), lambda: torch.randn(4, 5, 8, generator=_gen(7))),
    "transformer_hand": (HandBlock, lambda: torch.randn(4, 5, 8, generator=_gen(8))),
    "unknown_layer": (_mixed, lambda: torch.randn(5, 4, generator=_gen(9))),
    "shared_weights": (Shared, lambda: torch.randn(5, 4, generator=_gen(10))),
    "frozen": (_frozen, lambda: torch.randn(5, 5, generator=_gen(11))),
}


def build(name: str) -> tuple[Any, Any]:
    torch.manual_seed(hash(name) % 1000)
    factory, inputs = CASES[name]
    return _bn(factory()).eval(), inputs()


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kernel", ["traced", "full"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_implementation_matches_both_references(name: str, kernel: str) -> None:
    model, x = build(name)
    ref = reference_kernel(model, x, kernel)
    jac = backend_kernel(model, x, kernel, "jacobian")
    assert ref.shape == jac.shape
    assert rel(jac, ref) < RTOL
    for impl in ("auto", "structured"):
        assert rel(backend_kernel(model, x, kernel, impl), ref) < RTOL, impl


@pytest.mark.parametrize("name", ["mlp", "cnn", "embedding", "transformer_mha",
                                  "shared_weights", "unknown_layer"])
def test_structured_path_is_taken(name: str) -> None:
    model, x = build(name)
    assert uses_rules(model, x)


@pytest.mark.parametrize("name", ["cnn", "transformer_mha", "shared_weights", "unknown_layer"])
@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_tiny_memory_budget_gives_the_same_kernel(name: str, kernel: str) -> None:
    model, x = build(name)
    ref = reference_kernel(model, x, kernel)
    assert rel(backend_kernel(model, x, kernel, "structured", budget=4096), ref) < RTOL


@pytest.mark.parametrize("kernel", ["traced", "full"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "embedding", "transformer_mha",
                                  "unknown_layer", "shared_weights", "frozen"])
def test_diagonal_matches_the_full_kernel(name: str, kernel: str) -> None:
    model, x = build(name)
    ref = np.diag(reference_kernel(model, x, kernel))
    for impl in ("auto", "jacobian"):
        request = KernelRequest(kernel=kernel, dtype="float64",
                                implementation=Implementation(impl))
        diag = TorchBackend().diagonal(model, x, request)
        assert diag.shape == ref.shape
        assert rel(diag, ref) < RTOL, impl
    tiny = KernelRequest(kernel=kernel, dtype="float64", memory_budget=2048)
    assert rel(TorchBackend().diagonal(model, x, tiny), ref) < RTOL


def test_train_mode_and_batch_statistics_fall_back() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.Linear(4, 2)).eval()
    x = torch.randn(6, 3, generator=_gen(12))
    prep = prepare(model, torch.float64, "cpu")
    xs = as_inputs(x, torch.float64, "cpu")
    coupled = KernelRequest(dtype="float64", implementation=Implementation.STRUCTURED)
    assert structured_kernel(prep, xs, coupled, 2) is None
    train = KernelRequest(dtype="float64", train=True, implementation=Implementation.STRUCTURED)
    assert structured_kernel(prepare(_frozen(), torch.float64, "cpu"),
                             torch.randn(3, 5, dtype=torch.float64), train, 2) is None


def test_float32_agrees_with_float64() -> None:
    model, x = build("cnn")
    ref = reference_kernel(model, x, "full")
    request = KernelRequest(kernel="full", dtype="float32",
                            implementation=Implementation.STRUCTURED)
    k32 = TorchBackend().ntk(model, x, request).kernel
    assert k32.dtype == np.float32
    assert rel(k32.astype(np.float64), ref) < 1e-4
