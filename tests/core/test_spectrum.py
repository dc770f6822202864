"""The spectrum core against hand-derived values and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvcore import KernelError, collective_variables, eigenvalues
from cvcore.spectrum import default_tolerance


@pytest.mark.parametrize("dim", [1, 2, 5, 50])
def test_identity_has_maximal_entropy(dim: int) -> None:
    cv = collective_variables(np.eye(dim) * 3.0)
    assert cv.trace == pytest.approx(3.0 * dim)
    assert cv.normalized_trace == pytest.approx(3.0)
    assert cv.entropy == pytest.approx(math.log(dim), abs=1e-12)
    assert cv.effective_rank == pytest.approx(dim)
    assert cv.self_entropy == pytest.approx(math.log(dim), abs=1e-12)
    assert cv.magnitude_variance == pytest.approx(0.0, abs=1e-12)
    assert cv.covariance_entropy == pytest.approx(math.log(dim), abs=1e-12)
    if dim > 1:
        assert cv.effective_entropy == pytest.approx(1.0)
    else:
        assert cv.effective_entropy == 0.0


def test_rank_one_has_zero_entropy() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0])
    cv = collective_variables(np.outer(v, v))
    assert cv.entropy == pytest.approx(0.0, abs=1e-12)
    assert cv.effective_rank == pytest.approx(1.0)
    assert cv.trace == pytest.approx(30.0)
    # Every cosine is 1: the normalized kernel is all ones, rank one as well.
    assert cv.covariance_entropy == pytest.approx(0.0, abs=1e-12)
    # q_i = |v_i| / Σ|v| = (1, 2, 3, 4) / 10, by hand:
    q = np.array([0.1, 0.2, 0.3, 0.4])
    assert cv.self_entropy == pytest.approx(-(q * np.log(q)).sum())
    assert cv.magnitude_variance == pytest.approx(np.var(4 * q))  # = 0.2


def test_hand_computed_two_by_two() -> None:
    # [[2, 1], [1, 2]] has eigenvalues 3 and 1: p = (3/4, 1/4).
    cv = collective_variables(np.array([[2.0, 1.0], [1.0, 2.0]]))
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert list(cv.eigenvalues) == pytest.approx([3.0, 1.0])
    assert cv.entropy == pytest.approx(expected)
    assert cv.effective_entropy == pytest.approx(expected / math.log(2))
    # The cosine kernel is [[1, .5], [.5, 1]] with eigenvalues 1.5 and 0.5: same p.
    assert cv.covariance_entropy == pytest.approx(expected)
    assert cv.self_entropy == pytest.approx(math.log(2))


def test_diagonal_kernel_variables() -> None:
    cv = collective_variables(np.diag([4.0, 1.0, 0.0]))
    p = np.array([0.8, 0.2])
    assert cv.entropy == pytest.approx(-(p * np.log(p)).sum())
    q = np.array([2.0, 1.0]) / 3.0
    assert cv.self_entropy == pytest.approx(-(q * np.log(q)).sum())
    assert cv.magnitude_variance == pytest.approx(np.var([2.0, 1.0, 0.0]))
    # Zero-diagonal rows are dropped from the cosine kernel: identity of size 2 remains.
    assert cv.covariance_entropy == pytest.approx(math.log(2))


def random_psd(rng: np.random.Generator, dim: int, rank: int, scale: float) -> np.ndarray:
    a = rng.standard_normal((dim, rank))
    return scale * (a @ a.T)


def test_trace_is_sum_of_eigenvalues_and_descending() -> None:
    k = random_psd(np.random.default_rng(0), 20, 20, 1.0)
    cv = collective_variables(k)
    assert cv.trace == pytest.approx(np.trace(k))
    assert np.all(np.diff(cv.eigenvalues) <= 0)
    assert cv.eigenvalues.dtype == np.float64


def test_invariant_under_orthogonal_similarity() -> None:
    rng = np.random.default_rng(1)
    k = random_psd(rng, 12, 6, 1.0)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a, b = collective_variables(k), collective_variables(q @ k @ q.T)
    assert b.trace == pytest.approx(a.trace)
    assert b.entropy == pytest.approx(a.entropy, abs=1e-10)
    np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, atol=1e-10 * a.eigenvalues[0])


def test_rank_deficient_float32_with_negative_roundoff() -> None:
    rng = np.random.default_rng(2)
    j = rng.standard_normal((200, 5)).astype(np.float32)
    k = j @ j.T  # rank 5 of 200: the 195 zero eigenvalues come out as ± round-off
    assert np.linalg.eigvalsh(k.astype(np.float64)).min() < 0
    cv = collective_variables(k)
    assert cv.n_zeroed > 0
    assert np.all(cv.eigenvalues >= 0)
    assert all(np.isfinite(v) for v in (cv.entropy, cv.effective_rank, cv.covariance_entropy))
    assert cv.effective_rank <= 5.0 + 1e-3
    exact = collective_variables(j.astype(np.float64) @ j.astype(np.float64).T)
    assert cv.entropy == pytest.approx(exact.entropy, abs=1e-4)


def test_tolerance_is_relative_and_documented() -> None:
    assert default_tolerance(100, np.float64) == pytest.approx(64 * 10 * np.finfo(np.float64).eps)
    k = np.diag([1.0, -1e-3])
    with pytest.raises(KernelError, match="positive semi-definite.*-0.001"):
        eigenvalues(k)
    assert eigenvalues(k, tolerance=1e-2).n_zeroed == 1


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (np.ones((2, 3)), "square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "finite"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
        (np.zeros((3, 3)), "trace 0"),
        (np.array(["a"]), "numeric"),
    ],
)
def test_bad_kernels_are_refused(kernel: np.ndarray, message: str) -> None:
    with pytest.raises(KernelError, match=message):
        collective_variables(kernel)


@settings(max_examples=60, deadline=None)
@given(
    dim=st.integers(1, 30),
    rank_fraction=st.floats(0.0, 1.0),
    log_scale=st.floats(-12, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_psd_matrices(dim: int, rank_fraction: float, log_scale: float, seed: int) -> None:
    rank = max(1, round(rank_fraction * dim))
    k = random_psd(np.random.default_rng(seed), dim, rank, 10.0**log_scale)
    cv = collective_variables(k)
    assert 0.0 <= cv.entropy <= math.log(dim) + 1e-9
    assert 1.0 - 1e-9 <= cv.effective_rank <= min(rank, dim) * (1 + 1e-6) + 1e-6
    assert cv.trace == pytest.approx(np.trace(k), rel=1e-9)
    assert np.all(np.diff(cv.eigenvalues) <= 0)
    # Scale invariance of every entropy.
    unit = collective_variables(k / 10.0**log_scale)
    assert cv.entropy == pytest.approx(unit.entropy, abs=1e-8)
    assert cv.covariance_entropy == pytest.approx(unit.covariance_entropy, abs=1e-8)
