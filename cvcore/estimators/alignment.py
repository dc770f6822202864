"""Trace, target alignment and residual alignment of a kernel too large to form, from
vector-Jacobian products only.

NumPy only: the estimators receive a :class:`cvcore.protocols.JacobianProbes` (a backend's
``probes``), which turns cotangents ``Z`` (``N × O``, given as low-rank factors
``Z = A Sᵀ``) into the Gram matrix of their products ``Jᵀ vec Z``. With
``K = (1/O) Σ_o J_o J_oᵀ`` (traced) or ``K = J Jᵀ`` (full) and a cotangent ``Z`` whose
entries are uncorrelated with mean 0 and variance 1:

* ``Tr K = E‖Jᵀ vec Z‖² / O`` (traced; full: without ``/ O``), Hutchinson's estimator;
* ``⟨K, BBᵀ⟩ = E‖Jᵀ vec(B W)‖² / O`` for ``B`` ``N × C`` and ``W`` ``C × O`` of the same
  kind (traced; the full kernel's ``⟨K, vec B vec Bᵀ⟩ = ‖Jᵀ vec B‖²`` is one exact
  product). ``B = HY`` gives the alignment's numerator ``⟨HKH, HYYᵀH⟩``, ``B = R``
  the residual's ``Σ_c r_cᵀ K r_c``;
* ``‖HKH‖_F² = E[(vᵀHKHw)²]`` for independent Rademacher ``v, w``; ``vᵀHKHw`` of the
  traced kernel is estimated without bias by ``(1/O) (J_sᵀ Hv)·(J_sᵀ Hw)``, ``J_s = Σ_o s_o
  J_o`` with Rademacher ``s``, and the square by the product of two such estimates with
  independent ``s``. ``m`` vectors in one Gram matrix give all ``m(m−1)/2`` pairs.

Every estimate carries its standard error: over probes (trace, inner products), the
jackknife over vectors (the Frobenius norm's pairs), widened by
:func:`~cvcore.estimators.common.t_factor`; the alignments' by the delta method from their
parts, which come from independent probes. See ``docs/estimators.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError, KernelError
from cvcore.estimators.common import Estimate, Seed, check_counts, t_factor
from cvcore.protocols import JacobianProbes

F64 = NDArray[np.float64]

#: Cotangents per inner product and vectors for the Frobenius norm.
DEFAULT_ALIGNMENT_PROBES = 16
#: Columns of the low-rank factors ``Z = A Sᵀ`` when neither side is small.
DEFAULT_SKETCH_RANK = 16


@dataclass(frozen=True)
class Factor:
    """A matrix ``B`` (``N × C``) seen through products: ``project(W) = B W``.

    Attributes:
        n_rows: ``N``.
        n_cols: ``C``.
        project: ``W`` ``(C, k)`` to ``B W`` ``(N, k)``.
        sq_norm: ``‖B‖_F²``.
        gram_norm: ``‖BᵀB‖_F`` (``= ‖BBᵀ‖_F``, the target kernel's norm when ``B = HY``).
    """

    n_rows: int
    n_cols: int
    project: Callable[[F64], F64]
    sq_norm: float
    gram_norm: float


def dense_factor(values: NDArray[np.floating], centred: bool) -> Factor:
    """``B = values`` (``(N,)`` or ``(N, C)``), centred over the rows with ``centred``."""
    b = np.asarray(values, dtype=np.float64)
    b = b.reshape(-1, 1) if b.ndim == 1 else b
    if b.ndim != 2 or not np.isfinite(b).all():
        raise InputError(f"expected finite values of shape (N,) or (N, C), got shape "
                         f"{np.shape(values)}")
    if centred:
        b = b - b.mean(axis=0, keepdims=True)
    return Factor(b.shape[0], b.shape[1], lambda w: b @ w, float(np.sum(b * b)),
                  float(np.linalg.norm(b.T @ b)))


def labels_factor(labels: NDArray[np.integer]) -> Factor:
    """``B = HY`` for one-hot ``Y`` of integer ``labels`` (``N``), over the classes present
    (absent classes are zero columns, which change nothing)."""
    lab = np.asarray(labels).reshape(-1)
    classes, inv = np.unique(lab, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    n = lab.size
    gram = np.diag(counts) - np.outer(counts, counts) / n  # (HY)ᵀ(HY)

    def project(w: F64) -> F64:
        rows = w[inv]
        out: F64 = rows - rows.mean(axis=0, keepdims=True)
        return out

    return Factor(n, classes.size, project, float(np.trace(gram)), float(np.linalg.norm(gram)))


def cross_entropy_factor(logits: NDArray[np.floating], labels: NDArray[np.integer],
                         chunk: int = 256) -> Factor:
    """``B = R = softmax(f) − onehot(y)``, ``∂(Σ_i CE_i)/∂f``, without forming it: rows of
    ``logits`` (``N × O``) go through in chunks."""
    f = np.asarray(logits)
    lab = np.asarray(labels).reshape(-1).astype(np.int64)
    n, o = f.shape
    if lab.shape[0] != n or lab.min(initial=0) < 0 or lab.max(initial=0) >= o:
        raise InputError(f"expected {n} labels in [0, {o}), got {lab.shape[0]} in "
                         f"[{lab.min(initial=0)}, {lab.max(initial=0)}]")

    def probs(a: int, b: int) -> F64:
        z = f[a:b].astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        out: F64 = z / z.sum(axis=1, keepdims=True)
        return out

    sq = 0.0
    for a in range(0, n, chunk):
        p = probs(a, a + chunk)
        sq += float(np.sum(p * p)) - 2.0 * float(p[np.arange(p.shape[0]), lab[a:a + chunk]].sum())
    sq += n

    def project(w: F64) -> F64:
        out = np.empty((n, w.shape[1]))
        for a in range(0, n, chunk):
            out[a:a + chunk] = probs(a, a + chunk) @ w
        out -= w[lab]
        return out

    return Factor(n, o, project, sq, math.nan)


def _rademacher(rng: np.random.Generator, *shape: int) -> F64:
    return rng.integers(0, 2, size=shape).astype(np.float64) * 2.0 - 1.0


def unit_pair(rng: np.random.Generator, c: int, o: int, rank: int) -> tuple[F64, F64]:
    """``W`` ``(c, k)`` and ``S`` ``(o, k)`` such that ``W Sᵀ`` has uncorrelated entries of
    mean 0 and variance 1: Rademacher on the small side when one side is at most ``rank``,
    else the product of two Rademacher factors over ``√rank``."""
    if c <= rank:
        return np.eye(c), _rademacher(rng, o, c)
    if o <= rank:
        return _rademacher(rng, c, o), np.eye(o)
    return _rademacher(rng, c, rank) / math.sqrt(rank), _rademacher(rng, o, rank)


#: An estimate and its leave-one-out values (over probes, blocks or vectors).
Sampled = tuple[Estimate, F64]


def _mean(samples: F64) -> Sampled:
    m = samples.size
    se = float(np.std(samples, ddof=1) / math.sqrt(m)) * t_factor(m - 1) if m > 1 else math.inf
    loo = (samples.sum() - samples) / max(m - 1, 1)
    return Estimate(float(samples.mean()), se), loo


def _norm_sq(probes: JacobianProbes, a: F64, s: F64) -> float:
    g = np.asarray(probes.vjp_gram(a[None], s[None]), dtype=np.float64)
    if g.shape != (1, 1) or not np.isfinite(g).all():
        raise KernelError(f"expected a finite 1 × 1 Gram matrix from the probes, got {g!r}")
    return float(g[0, 0])


def probe_trace(probes: JacobianProbes, n_probes: int, rng: np.random.Generator, *,
                traced: bool = True, rank: int = DEFAULT_SKETCH_RANK) -> Estimate:
    """Hutchinson's ``Tr K`` from ``n_probes`` products, each ``‖Jᵀ vec Z‖²`` (``/ O`` traced)."""
    return _trace(probes, n_probes, rng, traced, rank)[0]


def _trace(probes: JacobianProbes, n_probes: int, rng: np.random.Generator, traced: bool,
           rank: int) -> Sampled:
    check_counts(probes.n_samples, probes=n_probes)
    scale = probes.n_outputs if traced else 1
    vals = np.empty(n_probes)
    for j in range(n_probes):
        a, s = unit_pair(rng, probes.n_samples, probes.n_outputs, rank)
        vals[j] = _norm_sq(probes, a, s) / scale
    return _mean(vals)


def probe_inner(probes: JacobianProbes, b: Factor, n_probes: int, rng: np.random.Generator,
                *, traced: bool = True, rank: int = DEFAULT_SKETCH_RANK) -> Estimate:
    """``⟨K, BBᵀ⟩`` (traced: ``Σ_c b_cᵀ K b_c``) from ``n_probes`` products of ``B W``;
    for the full kernel (``B`` ``N × O``) the one exact product ``‖Jᵀ vec B‖²``."""
    if b.n_rows != probes.n_samples:
        raise InputError(f"expected {probes.n_samples} rows of targets, got {b.n_rows}")
    if not traced:
        if b.n_cols != probes.n_outputs:
            raise InputError(f"expected {probes.n_outputs} target columns for the full "
                             f"kernel, got {b.n_cols}")
        return Estimate(_norm_sq(probes, b.project(np.eye(b.n_cols)), np.eye(b.n_cols)), 0.0)
    check_counts(probes.n_samples, probes=n_probes)
    vals = np.empty(n_probes)
    for j in range(n_probes):
        w, s = unit_pair(rng, b.n_cols, probes.n_outputs, rank)
        vals[j] = _norm_sq(probes, b.project(w), s) / probes.n_outputs
    return _mean(vals)[0]


def probe_centred_frobenius_sq(probes: JacobianProbes, vectors: int, rng: np.random.Generator,
                               *, block: int, traced: bool = True,
                               rank: int = DEFAULT_SKETCH_RANK) -> Estimate:
    """``‖HKH‖_F²`` from ``vectors`` Rademacher vectors in Gram blocks of ``block``: the mean
    over the pairs ``l ≠ l'`` of a block of ``G¹_{ll'} G²_{ll'}`` (two Gram matrices with
    independent output signs ``s``; one when ``O = 1`` or for the full kernel, which need no
    ``s``). Standard error: over the blocks' means when output signs are drawn (a block's
    pairs share them; a last, smaller block is left out), else the jackknife over the
    vectors."""
    return _frobenius(probes, vectors, rng, block, traced, rank)[0]


def _frobenius(probes: JacobianProbes, vectors: int, rng: np.random.Generator, block: int,
               traced: bool, rank: int) -> Sampled:
    check_counts(probes.n_samples, probes=vectors, block=block)
    if block < 2:
        raise InputError(f"expected a Gram block of at least 2 vectors, got {block}")
    n, o = probes.n_samples, probes.n_outputs
    two = traced and o > 1
    pairs: list[tuple[int, int, float]] = []
    start = 0
    while start < vectors:
        m = min(block, vectors - start)
        if m < 2 or (two and m < block):  # a lone last vector joins no pair; with signs,
            break  # the blocks are equally weighted units: a smaller last one is not drawn
        if traced:
            a = np.stack([_rademacher(rng, n, 1) for _ in range(m)])
            a -= a.mean(axis=1, keepdims=True)
            grams = []
            for _ in range(2 if two else 1):
                s = np.broadcast_to(_rademacher(rng, o, 1) if o > 1 else np.ones((1, 1)),
                                    (m, o, 1))
                grams.append(np.asarray(probes.vjp_gram(a, np.ascontiguousarray(s))) / o)
        else:
            facs = [unit_pair(rng, n, o, rank) for _ in range(m)]
            k = max(f[0].shape[1] for f in facs)
            a = np.zeros((m, n, k))
            s = np.zeros((m, o, k))
            for j, (w, sj) in enumerate(facs):
                a[j, :, :w.shape[1]] = w - w.mean(axis=0, keepdims=True)
                s[j, :, :sj.shape[1]] = sj
            grams = [np.asarray(probes.vjp_gram(a, s))]
        g1, g2 = grams[0], grams[-1]
        for i in range(m):
            for j in range(i + 1, m):
                pairs.append((start + i, start + j, float(g1[i, j] * g2[i, j])))
        start += m
    used = start
    if len(pairs) < 2:
        raise InputError(f"expected at least 3 vectors for the Frobenius norm, got {vectors}")
    vals = np.array([p[2] for p in pairs])
    owner = np.array([[p[0], p[1]] for p in pairs])
    if two:
        # the vectors of a block share their output signs: the blocks are the independent units
        means = np.array([vals[owner[:, 0] // block == b].mean() for b in range(used // block)])
        if means.size < 2:
            raise InputError(f"expected at least 2 Gram blocks of {block} vectors, got "
                             f"{vectors} vectors")
        return _mean(means)
    loo = np.array([vals[(owner[:, 0] != i) & (owner[:, 1] != i)].mean() for i in range(used)])
    se = math.sqrt((used - 1) / used * float(((loo - loo.mean()) ** 2).sum()))
    return Estimate(float(vals.mean()), se * t_factor(used - 1)), loo


@dataclass(frozen=True)
class AlignmentEstimates:
    """The estimates of :func:`probe_alignments`, each an :class:`Estimate`.

    Attributes:
        trace: ``Tr K``.
        target_alignment: ``⟨HKH, HYYᵀH⟩ / (‖HKH‖_F ‖HYYᵀH‖_F)`` (``None`` without targets).
        residual_alignment: ``Σ_c r_cᵀ K r_c / (‖R‖_F² Tr K)`` (``None`` without a residual).
        target_inner: ``⟨HKH, HYYᵀH⟩``.
        frobenius_sq: ``‖HKH‖_F²``.
        residual_inner: ``Σ_c r_cᵀ K r_c``.
        target_norm: ``‖HYYᵀH‖_F`` (exact).
        products: vector-Jacobian products used.
    """

    trace: Estimate
    target_alignment: Estimate | None = None
    residual_alignment: Estimate | None = None
    target_inner: Estimate | None = None
    frobenius_sq: Estimate | None = None
    residual_inner: Estimate | None = None
    target_norm: float | None = None
    products: int = 0


def ratio(num: Estimate, parts: list[tuple[Sampled, float]], const: float) -> Estimate:
    """``num / (const · Π part^power)``, the parts independent of ``num`` and of each other.

    Each ``part^{-power}`` is the jackknife's bias-corrected value over the part's
    leave-one-out values (``m·g(p̂) − (m−1)·mean g(p̂_{−i})``, ``g = p^{-power}``), so the
    ratio of an unbiased numerator has no first-order bias (the plain ``g(p̂)`` when a
    leave-one-out value is not positive). Standard error: the delta method,
    ``(se/v)² = (se_num/num)² + Σ (power · se_p/p)²``.
    """
    if not const > 0:  # constant targets or a zero residual: undefined, as exactly
        return Estimate(math.nan, math.nan)
    inv = 1.0 / const
    rel = (num.stderr / num.value) ** 2 if num.value != 0 else 0.0
    for (est, loo), power in parts:
        if not est.value > 0:
            return Estimate(math.nan, math.nan)
        m = loo.size
        g = est.value ** -power
        if (loo > 0).all():  # else (a noisy part) the plain value
            g = m * g - (m - 1) * float(np.mean(loo ** -power))
        inv *= g
        rel += (power * est.stderr / est.value) ** 2
    value = num.value * inv
    se = abs(value) * math.sqrt(rel) if num.value != 0 else num.stderr * abs(inv)
    return Estimate(value, se)


def probe_alignments(probes: JacobianProbes, *, targets: Factor | None, residual: Factor | None,
                     n_probes: int = DEFAULT_ALIGNMENT_PROBES, block: int = 4,
                     traced: bool = True, rank: int = DEFAULT_SKETCH_RANK,
                     trace: Estimate | None = None, rng: Seed = None) -> AlignmentEstimates:
    """The trace and the alignments asked for, from ``n_probes`` products each (the
    Frobenius norm from ``n_probes`` vectors in Gram blocks of ``block``).

    ``trace`` is used instead of Hutchinson's when given (e.g. exact from the diagonal).
    ``targets`` is ``HY`` (centred; :func:`labels_factor` or :func:`dense_factor`),
    ``residual`` is ``R`` (not centred).
    """
    gen = np.random.default_rng(rng)
    count = [0]
    base = probes.vjp_gram

    def counted(a: F64, s: F64) -> F64:
        count[0] += a.shape[0]
        return base(a, s)

    p = JacobianProbes(counted, probes.outputs, probes.n_samples, probes.n_outputs,
                       probes.n_params, probes.kernel)
    tr: Sampled = ((trace, np.full(2, trace.value)) if trace is not None
                   else _trace(p, n_probes, gen, traced, rank))
    ta = inner = fro = None
    if targets is not None:
        inner = probe_inner(p, targets, n_probes, gen, traced=traced, rank=rank)
        fro_s = _frobenius(p, n_probes, gen, block, traced, rank)
        fro = fro_s[0]
        ta = ratio(inner, [(fro_s, 0.5)], targets.gram_norm)
    ra = rinner = None
    if residual is not None:
        rinner = probe_inner(p, residual, n_probes, gen, traced=traced, rank=rank)
        ra = ratio(rinner, [(tr, 1.0)], residual.sq_norm)
    return AlignmentEstimates(tr[0], ta, ra, inner, fro, rinner,
                              targets.gram_norm if targets is not None else None, count[0])


__all__ = [
    "DEFAULT_ALIGNMENT_PROBES",
    "DEFAULT_SKETCH_RANK",
    "AlignmentEstimates",
    "Factor",
    "Sampled",
    "cross_entropy_factor",
    "dense_factor",
    "labels_factor",
    "probe_alignments",
    "probe_centred_frobenius_sq",
    "probe_inner",
    "probe_trace",
    "ratio",
    "unit_pair",
]
