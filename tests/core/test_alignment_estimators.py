"""The trace and alignment estimators from vector-Jacobian products
(:mod:`cvcore.estimators.alignment`) against exact float64 values: unbiased over seeds,
their standard errors covering the truth at the nominal rate, the backends' products
against explicit Jacobians, and the exact paths against per-sample autograd loops."""

from __future__ import annotations

import inspect
import math
from dataclasses import fields
from typing import Any

import numpy as np
import pytest

from cvcore.dynamics.alignment import residual_alignment, target_alignment
from cvcore.estimate import ESTIMATE_ONLY, alignment_cost, alignment_method, estimate
from cvcore.estimators.alignment import (
    dense_factor,
    labels_factor,
    probe_alignments,
    unit_pair,
)
from cvcore.protocols import JacobianProbes
from cvcore.request import EstimatorOptions, option_names

torch = pytest.importorskip("torch")

SEEDS = 200


def _mlp(n_out: int, n: int = 24, seed: int = 0) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, n_out)).double()
    return model, torch.randn(n, 6, dtype=torch.float64)


def _jacobian(model: Any, x: Any) -> np.ndarray:
    """``J`` as ``(N, O, P)`` float64, by ``torch.func.jacrev``."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    n = x.shape[0]
    return torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], -1).numpy()


def _explicit_probes(jac: np.ndarray, outputs: np.ndarray) -> JacobianProbes:
    """:class:`JacobianProbes` from an explicit Jacobian ``(N, O, P)``."""

    flat = jac.reshape(-1, jac.shape[2])

    def gram(a: np.ndarray, s: np.ndarray) -> np.ndarray:
        u = np.matmul(a, np.swapaxes(s, 1, 2)).reshape(a.shape[0], -1) @ flat
        out: np.ndarray = u @ u.T
        return out

    return JacobianProbes(gram, lambda: outputs, jac.shape[0], jac.shape[1], jac.shape[2])


def _centred(k: np.ndarray) -> np.ndarray:
    out: np.ndarray = k - k.mean(0) - k.mean(1)[:, None] + k.mean()
    return out


@pytest.mark.parametrize("n_out", [5, 1])
def test_unbiased_and_covering_over_seeds(n_out: int) -> None:
    """Over 200 seeds every estimate's mean lies within 4 standard errors of the exact value,
    and ``±2·stderr`` holds the exact value in 78-99.5 % of the seeds (95 % nominal; the
    Frobenius norm's skewed estimate in at least 78 %, the others at least 85 %): a variance
    formula off by a factor of 2 either way fails."""
    model, x = _mlp(n_out)
    jac = _jacobian(model, x)
    f = model(x).detach().numpy()
    probes = _explicit_probes(jac, f)
    rng = np.random.default_rng(1)
    k = np.einsum("iop,jop->ij", jac, jac) / n_out
    if n_out > 1:
        labels = rng.integers(0, n_out, x.shape[0])
        y = np.eye(n_out)[labels]
        targets = labels_factor(labels)
        ta_exact = target_alignment(k, labels)
    else:
        y = rng.normal(size=(x.shape[0], 1))
        targets = dense_factor(y, centred=True)
        ta_exact = target_alignment(k, y[:, 0])
    r = f - y
    ra_exact = residual_alignment(k, r, 1).quadratic
    yc = y - y.mean(0)
    truth = {"trace": np.trace(k), "target_inner": float(np.sum(yc * (_centred(k) @ yc))),
             "frobenius_sq": float(np.sum(_centred(k) ** 2)), "target_alignment": ta_exact,
             "residual_alignment": ra_exact,
             "residual_inner": float(np.sum(r * (k @ r)))}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in truth}
    for seed in range(SEEDS):
        est = probe_alignments(probes, targets=targets, residual=dense_factor(r, centred=False),
                               n_probes=16 if n_out == 1 else 32, block=8 if n_out == 1 else 4,
                               rng=seed)
        for name in truth:
            runs[name].append(tuple(getattr(est, name)))  # type: ignore[arg-type]
    for name, exact in truth.items():
        v = np.array(runs[name])
        spread = float(v[:, 0].std(ddof=1))
        if spread <= 1e-9 * abs(exact):  # one column and one output: the product is exact
            assert v[:, 0] == pytest.approx(exact, rel=1e-9), name
            continue
        z = (v[:, 0].mean() - exact) / (spread / math.sqrt(SEEDS))
        assert abs(z) < 4.0, (name, z)
        covered = float(np.mean(np.abs(v[:, 0] - exact) <= 2.0 * v[:, 1]))
        low = 0.78 if name == "frobenius_sq" else 0.85
        assert low <= covered <= 0.995, (name, covered)


def test_cotangent_factors_have_unit_uncorrelated_entries() -> None:
    """``W Sᵀ`` of :func:`unit_pair` has second moments ``δ``: the estimators' premise."""
    rng = np.random.default_rng(0)
    for c, o in [(3, 12), (12, 3), (9, 8)]:
        pairs = [unit_pair(rng, c, o, rank=4) for _ in range(3000)]
        z = np.stack([(w @ s.T).reshape(-1) for w, s in pairs])
        acc = z.T @ z / 3000
        assert np.abs(np.diag(acc) - 1).max() < 0.15
        assert np.abs(acc - np.diag(np.diag(acc))).max() < 0.15


def test_torch_probes_gram_matches_explicit_jacobian() -> None:
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.validate import make_request

    model, x = _mlp(5, n=7)
    jac = _jacobian(model, x)
    probes = TorchBackend().probes(model, x, make_request(dtype="float64"))
    rng = np.random.default_rng(0)
    a, s = rng.normal(size=(3, 7, 2)), rng.normal(size=(3, 5, 2))
    u = np.stack([np.einsum("nk,ok,nop->p", a[j], s[j], jac) for j in range(3)])
    np.testing.assert_allclose(probes.vjp_gram(a, s), u @ u.T, rtol=1e-10)
    np.testing.assert_allclose(probes.outputs(), model(x).detach().numpy(), rtol=1e-12)
    assert (probes.n_samples, probes.n_outputs, probes.n_params) == (7, 5, jac.shape[2])


def test_jax_probes_gram_matches_explicit_jacobian() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from cvcore.backends.jax.backend import JaxBackend
    from cvcore.backends.jax.setup import x64_scope

    from cvcore.validate import make_request

    with x64_scope(True):
        key = jax.random.PRNGKey(0)
        params = {"w1": jax.random.normal(key, (4, 8)),
                  "w2": jax.random.normal(jax.random.PRNGKey(1), (8, 3))}

        def apply(p: Any, x: Any) -> Any:
            return jnp.tanh(x @ p["w1"]) @ p["w2"]

        x = np.random.default_rng(0).normal(size=(6, 4))
        jac = jax.jacrev(lambda p: apply(p, jnp.asarray(x)))(params)
        j = np.concatenate([np.asarray(jac[k]).reshape(6, 3, -1) for k in sorted(jac)], -1)
        probes = JaxBackend().probes((apply, params), x, make_request(dtype="float64"))
        rng = np.random.default_rng(0)
        a, s = rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 3, 2))
        u = np.stack([np.einsum("nk,ok,nop->p", a[i], s[i], j) for i in range(3)])
        np.testing.assert_allclose(probes.vjp_gram(a, s), u @ u.T, rtol=1e-8)
        # and the alignments through cvcore.estimate on the JAX model, exact and probed
        labels = np.array([0, 1, 2, 0, 1, 2])
        exact = estimate((apply, params), x, dtype="float64", method="exact", targets=labels)
        k = np.einsum("iop,jop->ij", j, j) / 3
        assert exact.target_alignment == pytest.approx(target_alignment(k, labels), rel=1e-8)
        probed = estimate((apply, params), x, dtype="float64", method="stochastic",
                          targets=labels, alignment_probes=64, spectrum=False)
        assert abs(probed.target_alignment - exact.target_alignment) < \
            4 * probed.target_alignment_stderr
        assert probed.alignment_method == "probes" and math.isnan(probed.entropy)


def test_exact_alignments_match_the_formed_kernel() -> None:
    model, x = _mlp(4, n=12)
    jac = _jacobian(model, x)
    k = np.einsum("iop,jop->ij", jac, jac) / 4
    labels = np.arange(12) % 4
    f = model(x).detach().numpy()
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(4)[labels]
    est = estimate(model, x, dtype="float64", method="exact", targets=labels,
                   residual="cross_entropy")
    assert est.alignment_method == "exact" and est.target_alignment_stderr == 0.0
    assert est.target_alignment == pytest.approx(target_alignment(k, labels), rel=1e-9)
    assert est.residual_alignment == pytest.approx(residual_alignment(k, r, 1).quadratic,
                                                   rel=1e-9)
    assert est.trace == pytest.approx(np.trace(k), rel=1e-9)


def _neox(vocab: int = 16) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=vocab,
                                     max_position_embeddings=32, rotary_pct=0.25,
                                     attn_implementation="eager")
    return transformers.GPTNeoXForCausalLM(cfg).eval().double()


def test_loss_kernel_exact_against_per_sample_autograd_loop() -> None:
    """``K_ij = ∇ℓ_i·∇ℓ_j`` of each sequence's mean next-token loss, its target alignment with
    the losses and its residual alignment with ``∂L/∂ℓ = 1`` (the gradients' coherence)."""
    from cvcore.backends.torch.operator import next_token_loss

    model = _neox()
    ids = np.random.default_rng(0).integers(0, 16, (5, 6))
    est = estimate(model, ids, output=next_token_loss, dtype="float64", targets="outputs",
                   residual="ones")
    grads, losses = [], []
    for i in range(5):
        model.zero_grad()
        t = torch.tensor(ids[i:i + 1])
        loss = next_token_loss(model(input_ids=t), {"input_ids": t}).sum()
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]).numpy())
    g = np.stack(grads)
    k = g @ g.T
    # the per-layer Gram from one forward and one backward pass (no fallback to the kernel path)
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.plan import bind
    from cvcore.validate import make_request

    r, _ = bind(model, ids, make_request(dtype="float64", output=next_token_loss), None)
    probes = TorchBackend().probes(r.model, r.inputs, r.request)
    assert probes.kernel is not None
    formed = probes.kernel()
    assert formed is not None
    np.testing.assert_allclose(formed, k, rtol=1e-9, atol=1e-12 * np.abs(k).max())
    assert est.alignment_method == "exact"
    assert est.trace == pytest.approx(np.trace(k), rel=1e-9)
    assert est.target_alignment == pytest.approx(target_alignment(k, np.array(losses)), rel=1e-8)
    assert est.residual_alignment == pytest.approx(k.sum() / (5 * np.trace(k)), rel=1e-9)


def test_language_model_positions_probes_match_the_positions_kernel() -> None:
    """``sample_axes=2``: each position with a next token is a sample; the products rebuild
    the adapter's ``positions`` kernel on those positions exactly."""
    from cvcore.backends.torch.backend import TorchBackend
    from cvcore.backends.torch.operator import next_token_logits

    import cvcore
    from cvcore.plan import bind
    from cvcore.validate import make_request

    model = _neox(vocab=8)
    ids = np.random.default_rng(1).integers(0, 8, (2, 4))
    kpos = cvcore.ntk(model, ids, output="positions", dtype="float64")
    keep = [b * 4 + t for b in range(2) for t in range(3)]
    k = kpos[np.ix_(keep, keep)]
    r, _ = bind(model, ids, make_request(dtype="float64", output=next_token_logits), None)
    probes = TorchBackend().probes(r.model, r.inputs, r.request, sample_axes=2)
    n, o = probes.n_samples, probes.n_outputs
    assert (n, o) == (6, 8)
    a = np.repeat(np.eye(n)[:, None, :, None], o, axis=1).reshape(n * o, n, 1)
    s = np.tile(np.eye(o)[:, :, None], (n, 1, 1))
    g = probes.vjp_gram(a, s).reshape(n, o, n, o)
    rebuilt = np.einsum("iojo->ij", g) / o
    np.testing.assert_allclose(rebuilt, k, rtol=1e-8, atol=1e-10 * np.abs(k).max())


def test_language_model_logits_estimate_end_to_end() -> None:
    """``cvcore.estimate`` on a GPT-NeoX's logits, every position a sample: the trace and both
    alignments within 4 of their standard errors of the exact values of the positions kernel
    (one fixed seed)."""
    from cvcore.backends.torch.operator import next_token_logits

    import cvcore

    model = _neox(vocab=8)
    ids = np.random.default_rng(1).integers(0, 8, (3, 5))
    kpos = cvcore.ntk(model, ids, output="positions", dtype="float64")
    keep = [b * 5 + t for b in range(3) for t in range(4)]
    k = kpos[np.ix_(keep, keep)]
    labels = ids[:, 1:].reshape(-1)
    f = model(input_ids=torch.tensor(ids)).logits[:, :-1].reshape(-1, 8).detach().numpy()
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(8)[labels]
    est = estimate(model, ids, output=next_token_logits, sample_axes=2, dtype="float64",
                   targets=labels, residual="cross_entropy", spectrum=False,
                   alignment_probes=32)
    assert est.alignment_method == "probes" and est.dim == 12
    for value, se, exact in [(est.trace, est.trace_stderr, np.trace(k)),
                             (est.target_alignment, est.target_alignment_stderr,
                              target_alignment(k, labels)),
                             (est.residual_alignment, est.residual_alignment_stderr,
                              residual_alignment(k, r, 1).quadratic)]:
        assert 0 < se < 0.5 * abs(exact)
        assert abs(value - exact) < 4 * se


def test_auto_chooses_by_cost() -> None:
    opts = EstimatorOptions(alignment_probes=8)
    assert alignment_cost(1, 8, True, True) == (1, 8 + 16 + 8)
    assert alignment_cost(10, 8, True, False) == (10, 8 + 8 + 16)
    assert alignment_method(opts, 100, 1, True, True) == "exact"
    assert alignment_method(opts, 100, 50304, True, True) == "probes"
    assert alignment_method(EstimatorOptions(sample_axes=2), 100, 1, True, True) == "probes"
    assert alignment_method(EstimatorOptions(method="exact"), 100, 50304, True, True) == "exact"
    model, x = _mlp(80, n=10)
    labels = np.arange(10) % 80
    many = estimate(model, x, dtype="float64", targets=labels, alignment_probes=16,
                    spectrum=False)
    assert many.alignment_method == "probes"  # 80 backward passes exact vs 16 + 16 + 32
    model, x = _mlp(3, n=10)
    assert estimate(model, x, dtype="float64", targets=np.arange(10) % 3).alignment_method == "exact"


def test_estimate_keywords_are_the_option_lists() -> None:
    """``estimate`` spells out the measure options, the estimator's settings and its data."""
    params = inspect.signature(estimate).parameters
    keywords = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    expected = (*option_names(), *(f.name for f in fields(EstimatorOptions)), *ESTIMATE_ONLY)
    assert sorted(keywords) == sorted(expected)
    assert not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())


class _TokenModel(torch.nn.Module):  # type: ignore[misc]
    """Embedding, layer norm and two dense layers, one output per sample: every rule of the
    per-layer Gram (embedding rows, layer norm, dense by ghost Gram and by per-sample rows)."""

    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.mix = torch.nn.Conv1d(8, 8, 1) if conv else torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, ids: Any) -> Any:
        h = self.norm(self.emb(ids))
        h = self.mix(h.transpose(1, 2)).transpose(1, 2) if isinstance(self.mix, torch.nn.Conv1d) \
            else self.mix(h)
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("conv", [False, True])
def test_per_layer_gram_against_per_sample_loop(conv: bool) -> None:
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.validate import make_request

    torch.manual_seed(0)
    model = _TokenModel(conv).double()
    ids = torch.randint(0, 12, (6, 5))
    grads = []
    for i in range(6):
        model.zero_grad()
        model(ids[i:i + 1]).sum().backward()
        grads.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]).numpy())
    g = np.stack(grads)
    probes = TorchBackend().probes(model, ids, make_request(dtype="float64"))
    assert probes.kernel is not None
    formed = probes.kernel()
    if conv:  # a layer without a rule: no kernel here, estimate forms it the usual way
        assert formed is None
        est = estimate(model, ids, dtype="float64", targets=np.arange(6) % 2)
        assert est.trace == pytest.approx(np.trace(g @ g.T), rel=1e-9)
    else:
        np.testing.assert_allclose(formed, g @ g.T, rtol=1e-9, atol=1e-13)


def test_exact_alignment_refuses_targets_for_another_number_of_samples() -> None:
    """Two labels for six samples: the exact path refuses them (it once read them as a
    full kernel of two samples and returned a number)."""
    torch = pytest.importorskip("torch")
    from cvcore.errors import InputError

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(6, 4)
    with pytest.raises(InputError, match="6 samples, got 2"):
        estimate(m, x, targets=np.array([0, 1]), method="exact")
    with pytest.raises(InputError, match="6 samples, got 4"):
        estimate(m, x, residual=np.ones((4, 3)), method="exact")
    k = cvcore_ntk(m, x)
    labels = np.arange(6) % 3
    got = estimate(m, x, targets=labels, method="exact", dtype="float64").target_alignment
    assert got == pytest.approx(target_alignment(k, labels, layout="traced"), rel=1e-9)


def cvcore_ntk(model: Any, x: Any) -> np.ndarray:
    import cvcore

    return cvcore.ntk(model, x, dtype="float64")
