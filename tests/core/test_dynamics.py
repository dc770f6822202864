"""cvcore.dynamics against float64 computations written from the formulas here (explicit
centring matrices, explicit loops, a second decomposition), and hand-built kernels with
known answers for the motion variables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvcore import dynamics as dyn
from cvcore.errors import InputError, KernelError
from cvcore.request import Compute, EstimatorOptions, Options
from cvcore.validate import check_target_count, check_targets, measure_request
from tests.tolerance import rel_error

RNG = np.random.default_rng(20261206)


def psd(d: int, rank: int | None = None) -> np.ndarray:
    a = RNG.normal(size=(d, rank or d))
    return a @ a.T


def centring(n: int) -> np.ndarray:
    h = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            h[i, j] = (1.0 if i == j else 0.0) - 1.0 / n
    return h


def one_hot_loop(labels: list[int], c: int) -> np.ndarray:
    y = np.zeros((len(labels), c))
    for i, lab in enumerate(labels):
        y[i, lab] = 1.0
    return y


def alignment_reference(k: np.ndarray, t: np.ndarray, h: np.ndarray) -> float:
    kc, tc = h @ k @ h, h @ t @ h
    inner = sum(kc[i, j] * tc[i, j] for i in range(k.shape[0]) for j in range(k.shape[0]))
    return inner / (math.sqrt((kc * kc).sum()) * math.sqrt((tc * tc).sum()))


# --------------------------------------------------------------------------- targets


def test_one_hot_and_targets():
    labels = [2, 0, 1, 2]
    np.testing.assert_array_equal(dyn.one_hot(labels), one_hot_loop(labels, 3))
    np.testing.assert_array_equal(dyn.one_hot(labels, 5), one_hot_loop(labels, 5))
    assert dyn.as_targets(np.array([0.5, 1.5])).shape == (2, 1)
    with pytest.raises(InputError, match="below 2"):
        dyn.one_hot(labels, 2)
    with pytest.raises(InputError, match=">= 0"):
        dyn.one_hot([0, -1])
    with pytest.raises(InputError, match="integer class labels"):
        dyn.one_hot([0.5, 1.0])
    with pytest.raises(InputError, match="finite"):
        dyn.as_targets(np.array([0.0, np.nan]))


# --------------------------------------------------------------------------- alignment


def test_target_alignment_traced_labels_and_values():
    n = 9
    k = psd(n)
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 1]
    y = one_hot_loop(labels, 3)
    expected = alignment_reference(k, y @ y.T, centring(n))
    assert rel_error(dyn.target_alignment(k, np.array(labels)), expected) < 1e-12
    values = RNG.normal(size=(n, 2))
    expected = alignment_reference(k, values @ values.T, centring(n))
    assert rel_error(dyn.target_alignment(k, values), expected) < 1e-12
    # 1-D real targets are one column
    v = RNG.normal(size=n)
    expected = alignment_reference(k, np.outer(v, v), centring(n))
    assert rel_error(dyn.target_alignment(k, v), expected) < 1e-12


def test_target_alignment_known_values():
    labels = np.array([0, 1, 0, 1, 1, 0])
    y = one_hot_loop(labels.tolist(), 2)
    h = centring(6)
    ideal = h @ y @ y.T @ h  # the centred label kernel itself
    assert abs(dyn.target_alignment(ideal, labels) - 1.0) < 1e-12
    assert abs(dyn.target_alignment(3.0 * y @ y.T + 2.0, labels) - 1.0) < 1e-12  # centring removes the constant
    # a kernel orthogonal to the centred label kernel: alignment 0
    v = h @ np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    v -= (v @ (h @ y[:, 0])) / ((h @ y[:, 0]) @ (h @ y[:, 0])) * (h @ y[:, 0])
    assert abs(dyn.target_alignment(np.outer(v, v), labels)) < 1e-12


def test_target_alignment_full_kernel_layout():
    n, o = 5, 3
    k = psd(n * o)
    y = RNG.normal(size=(n, o))
    vec = np.zeros(n * o)
    for i in range(n):
        for j in range(o):
            vec[i * o + j] = y[i, j]  # sample-major, row i·O + o
    h_full = np.kron(centring(n), np.eye(o))  # each output centred over the samples
    expected = alignment_reference(k, np.outer(vec, vec), h_full)
    assert rel_error(dyn.target_alignment(k, y), expected) < 1e-12
    four = k.reshape(n, o, n, o)
    assert rel_error(dyn.target_alignment(four, y), expected) < 1e-12
    labels = [0, 2, 1, 1, 0]
    lv = one_hot_loop(labels, o).reshape(-1)
    expected = alignment_reference(k, np.outer(lv, lv), h_full)
    assert rel_error(dyn.target_alignment(k, np.array(labels)), expected) < 1e-12
    centred = dyn.centre(k, n)
    assert rel_error(centred, h_full @ k @ h_full) < 1e-12


def test_target_alignment_degenerate():
    k = psd(4)
    assert math.isnan(dyn.target_alignment(k, np.array([1, 1, 1, 1])))  # one class
    assert math.isnan(dyn.target_alignment(k, np.full(4, 0.1)))  # constant values
    assert math.isnan(dyn.target_alignment(np.zeros((4, 4)), np.array([0, 1, 0, 1])))
    assert math.isnan(dyn.target_alignment(np.full((4, 4), 2.5), np.array([0, 1, 0, 1])))
    assert math.isnan(dyn.target_alignment(np.ones((1, 1)), np.array([0])))  # N = 1
    bad = k.copy()
    bad[0, 1] = bad[1, 0] = np.nan
    with pytest.raises(KernelError, match="finite"):
        dyn.target_alignment(bad, np.array([0, 1, 0, 1]))
    with pytest.raises(KernelError, match="symmetric"):
        dyn.target_alignment(k + np.triu(np.ones((4, 4)), 1), np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match="targets of shape"):
        dyn.target_alignment(k, np.array([0, 1, 0]))
    with pytest.raises(InputError, match="targets of shape"):
        dyn.target_alignment(psd(12), RNG.normal(size=(4, 2)))  # 12 != 4 and != 8


def _fractions_reference(k: np.ndarray, r: np.ndarray) -> np.ndarray:
    u, _, _ = np.linalg.svd(k)  # a PSD kernel's left singular vectors are its eigenvectors
    total = sum(x * x for x in r)
    out, acc = [], 0.0
    for i in range(k.shape[0]):
        acc += float(u[:, i] @ r) ** 2
        out.append(acc / total)
    return np.array(out)


def _quadratic_reference(k: np.ndarray, r: np.ndarray) -> float:
    d = k.shape[0]
    num = sum(r[i] * k[i, j] * r[j] for i in range(d) for j in range(d))
    return num / (sum(x * x for x in r) * sum(k[i, i] for i in range(d)))


def test_residual_alignment_traced():
    n = 8
    k = psd(n)
    r = RNG.normal(size=n)
    ra = dyn.residual_alignment(k, r)
    assert rel_error(ra.fractions, _fractions_reference(k, r)) < 1e-10
    assert abs(ra.fractions[-1] - 1.0) < 1e-12 and np.all(np.diff(ra.fractions) >= -1e-15)
    assert rel_error(ra.quadratic, _quadratic_reference(k, r)) < 1e-12
    assert rel_error(ra.eigenvalues, np.sort(np.linalg.eigvalsh(k))[::-1]) < 1e-12
    assert ra.layout == "traced"
    assert rel_error(dyn.residual_alignment(k, r, k=3).fractions, _fractions_reference(k, r)[:3]) < 1e-10
    # several columns against the traced kernel: Σ_c r_cᵀ K r_c / (‖R‖² Tr K), and the
    # fractions of K ⊗ I_C on vec(R) at every C-th mode (each eigenvalue C times)
    rr = RNG.normal(size=(n, 3))
    ra = dyn.residual_alignment(k, rr)
    num = sum(rr[i, c] * k[i, j] * rr[j, c] for c in range(3) for i in range(n) for j in range(n))
    assert rel_error(ra.quadratic, num / ((rr * rr).sum() * np.trace(k))) < 1e-12
    u = np.linalg.svd(k)[0]
    per_mode = [sum(float(u[:, i] @ rr[:, c]) ** 2 for c in range(3)) for i in range(n)]
    assert rel_error(ra.fractions, np.cumsum(per_mode) / (rr * rr).sum()) < 1e-10


def test_residual_alignment_full_and_known():
    n, o = 4, 2
    k = psd(n * o)
    rr = RNG.normal(size=(n, o))
    flat = np.array([rr[i, j] for i in range(n) for j in range(o)])
    ra = dyn.residual_alignment(k, rr)
    assert ra.layout == "full"
    assert rel_error(ra.fractions, _fractions_reference(k, flat)) < 1e-10
    assert rel_error(ra.quadratic, _quadratic_reference(k, flat)) < 1e-12
    known = dyn.residual_alignment(np.diag([3.0, 2.0, 1.0]), np.array([0.0, 2.0, 0.0]))
    np.testing.assert_allclose(known.fractions, [0.0, 1.0, 1.0], atol=1e-15)
    assert abs(known.quadratic - 2.0 / 6.0) < 1e-15


def test_residual_alignment_degenerate():
    k = psd(3)
    zero = dyn.residual_alignment(k, np.zeros(3))
    assert np.isnan(zero.fractions).all() and math.isnan(zero.quadratic)
    flat = dyn.residual_alignment(np.zeros((3, 3)), np.ones(3))
    assert np.isnan(flat.fractions).all() and math.isnan(flat.quadratic)
    with pytest.raises(InputError, match="between 1 and"):
        dyn.residual_alignment(k, np.ones(3), k=4)
    with pytest.raises(InputError, match="residual"):
        dyn.residual_alignment(k, np.ones(5))
    assert dyn.residual(np.zeros((2, 3)), np.array([2, 0])).tolist() == [[0, 0, -1], [-1, 0, 0]]
    with pytest.raises(InputError, match="labels below 3"):
        dyn.residual(np.zeros((2, 3)), np.array([3, 0]))
    with pytest.raises(InputError, match="outputs' shape"):
        dyn.residual(np.zeros((2, 3)), np.zeros((2, 2)))


# --------------------------------------------------------------------------- motion


def _distance_reference(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[0]
    ab = sum(a[i, j] * b[i, j] for i in range(d) for j in range(d))
    return 1.0 - ab / math.sqrt(sum(a[i, j] ** 2 for i in range(d) for j in range(d))
                                * sum(b[i, j] ** 2 for i in range(d) for j in range(d)))


def test_kernel_distance_and_velocity():
    a, b = psd(6), psd(6)
    assert rel_error(dyn.kernel_distance(a, b), _distance_reference(a, b)) < 1e-12
    assert dyn.kernel_distance(a, a) == pytest.approx(0.0, abs=1e-15)
    assert dyn.kernel_distance(a, 7.0 * a) == pytest.approx(0.0, abs=1e-15)
    left = np.diag([1.0, 2.0, 0.0, 0.0])
    right = np.zeros((4, 4))
    right[2:, 2:] = psd(2)  # support on the other two samples
    assert dyn.kernel_distance(left, right) == 1.0
    assert rel_error(dyn.kernel_velocity(a, b, 4), _distance_reference(a, b) / 4) < 1e-12
    assert math.isnan(dyn.kernel_distance(a, np.zeros((6, 6))))
    with pytest.raises(InputError, match="same shape"):
        dyn.kernel_distance(a, psd(5))
    for gap in (0, -1, float("nan"), "2"):
        with pytest.raises(InputError, match="positive number of steps"):
            dyn.kernel_velocity(a, b, gap)  # type: ignore[arg-type]


def _rotation(d: int, i: int, j: int, theta: float) -> np.ndarray:
    r = np.eye(d)
    r[i, i] = r[j, j] = math.cos(theta)
    r[i, j], r[j, i] = -math.sin(theta), math.sin(theta)
    return r


def test_eigenspace_known_answers():
    k = np.diag([4.0, 3.0, 2.0, 1.0])
    assert dyn.eigenspace_overlap(k, k, 2) == pytest.approx(1.0, abs=1e-14)
    swapped = np.diag([1.0, 2.0, 3.0, 4.0])  # top-2 on the other two coordinates
    assert dyn.eigenspace_overlap(k, swapped, 2) == pytest.approx(0.0, abs=1e-14)
    rot = dyn.eigenspace_rotation(k, swapped, 2)
    np.testing.assert_allclose(rot.angles, [math.pi / 2] * 2, atol=1e-12)
    for theta in (0.3, 1e-6, 1.2):
        r = _rotation(4, 1, 2, theta)  # turns e2 towards e3: span(e1, e2) by theta
        turned = r @ k @ r.T
        rot = dyn.eigenspace_rotation(k, turned, 2)
        assert abs(rot.angles[0]) < 1e-7 and abs(rot.angles[1] - theta) < 1e-9 * max(1, theta / 1e-6)
        assert rot.overlap == pytest.approx((1.0 + math.cos(theta) ** 2) / 2, abs=1e-12)
        assert rot.gaps == pytest.approx((0.25, 0.25), abs=1e-12)
    k1 = dyn.eigenspace_rotation(np.diag([2.0, 1.0]), _rotation(2, 0, 1, 0.5) @ np.diag([2.0, 1.0])
                                 @ _rotation(2, 0, 1, 0.5).T, 1)
    assert k1.overlap == pytest.approx(math.cos(0.5) ** 2, abs=1e-12)
    assert k1.angles[0] == pytest.approx(0.5, abs=1e-12)


def test_eigenspace_degenerate_and_bases():
    tie = dyn.eigenspace_rotation(np.eye(3), np.diag([3.0, 2.0, 1.0]), 1)
    assert tie.gaps[0] == 0.0 and tie.gaps[1] == pytest.approx(1 / 3)  # tie reported
    assert math.isnan(dyn.eigenspace_overlap(np.zeros((3, 3)), np.eye(3), 1))
    with pytest.raises(InputError, match="between 1 and"):
        dyn.eigenspace_overlap(np.eye(3), np.eye(3), 4)
    with pytest.raises(InputError, match="between 1 and"):
        dyn.eigenspace_overlap(np.eye(3), np.eye(3), 0)
    a, b = psd(7), psd(7)
    lam, u = dyn.top_eigenvectors(a, 3)
    _, v = dyn.top_eigenvectors(b, 3)
    # reference: a second decomposition (SVD) and explicit sums
    ua = np.linalg.svd(a)[0][:, :3]
    ub = np.linalg.svd(b)[0][:, :3]
    m = ua.T @ ub
    ref = sum(m[i, j] ** 2 for i in range(3) for j in range(3)) / 3
    assert rel_error(dyn.subspace_overlap(u, v), ref) < 1e-10
    assert rel_error(dyn.eigenspace_overlap(a, b, 3), ref) < 1e-10
    cosines = np.linalg.svd(m, compute_uv=False)
    assert rel_error(np.cos(dyn.principal_angles(u, v)), cosines) < 1e-10
    assert rel_error(lam, np.sort(np.linalg.eigvalsh(a))[::-1][:3]) < 1e-12
    with pytest.raises(InputError, match="orthonormal"):
        dyn.subspace_overlap(2.0 * u, v)
    with pytest.raises(InputError, match="same shape"):
        dyn.principal_angles(u, v[:, :2])


def test_top_eigenvalues():
    k = psd(6, rank=3)  # three zero eigenvalues, some round-off negative
    top = dyn.top_eigenvalues(k)
    ref = np.sort(np.linalg.eigvalsh(k))[::-1]
    assert rel_error(top[:3], ref[:3]) < 1e-12 and (top >= 0).all() and (top[3:] < 1e-10).all()
    assert dyn.top_eigenvalues(k, 2).shape == (2,)
    with pytest.raises(InputError, match="between 1 and"):
        dyn.top_eigenvalues(k, 7)


def test_task_alignment_matches_its_parts():
    n, o = 6, 3
    k = psd(n)
    f = RNG.normal(size=(n, o))
    labels = np.array([0, 2, 1, 1, 0, 2])
    y = one_hot_loop(labels.tolist(), o)
    layer = psd(n)
    ta = dyn.task_alignment(k, labels, f, layers=[("a", layer)], top_k=4)
    assert rel_error(ta.target_alignment, alignment_reference(k, y @ y.T, centring(n))) < 1e-12
    big = np.kron(k, np.eye(o))  # Tr(K ⊗ I_O) = O Tr K: the traced quotient is O times it
    r = (f - y).reshape(-1)
    assert rel_error(ta.residual_alignment, o * _quadratic_reference(big, r)) < 1e-12
    assert ta.residual_norm == pytest.approx(math.sqrt(sum(x * x for x in r)), rel=1e-12)
    assert rel_error(ta.top_eigenvalues, np.sort(np.linalg.eigvalsh(k))[::-1][:4]) < 1e-12
    assert ta.layers[0].layer == "a"
    assert rel_error(ta.layers[0].target_alignment,
                     alignment_reference(layer, y @ y.T, centring(n))) < 1e-12
    assert "one-hot targets (3 classes)" in ta.convention and ta.convention.startswith("traced")
    assert ta.to_dict()["layers"][0]["layer"] == "a"
    with pytest.raises(InputError, match="kernel over the 6 samples"):
        dyn.task_alignment(psd(5), labels, f)


# --------------------------------------------------------------------------- the request


def test_targets_in_the_request():
    t = check_targets(np.array([0, 1, 1]), 3)
    assert t.labels and t.values.dtype == np.int64
    req = measure_request(Options(), variables="trace", targets=t)
    assert req.compute is Compute.KERNEL  # targets need the kernel
    assert measure_request(Options(), variables="trace").compute is Compute.DIAGONAL
    with pytest.raises(InputError, match="one target per probe sample \\(4\\), got 3"):
        check_targets([0, 1, 1], 4)
    with pytest.raises(InputError, match="one target per probe sample"):
        check_target_count(t, 5)
    with pytest.raises(InputError, match=">= 0"):
        check_targets([0, -1])
    with pytest.raises(InputError, match="shape \\(N,\\) or \\(N, C\\)"):
        check_targets(np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match="finite"):
        check_targets([0.0, np.inf])
    with pytest.raises(InputError, match="exact kernel"):
        measure_request(Options(), targets=t, estimator=EstimatorOptions(method="stochastic"))


def test_top_eigenpairs_one_decomposition():
    k = psd(7)
    e = dyn.top_eigenpairs(k, 3)
    ref = np.sort(np.linalg.eigvalsh(k))[::-1]
    assert rel_error(e.values, ref[:3]) < 1e-12
    assert rel_error(k @ e.vectors, e.vectors * e.values) < 1e-12  # K u = λ u, column by column
    assert rel_error(e.vectors.T @ e.vectors, np.eye(3)) < 1e-12
    assert rel_error(e.gap, (ref[2] - ref[3]) / ref[0]) < 1e-12
    assert rel_error(e.trace, sum(k[i, i] for i in range(7))) < 1e-12
    assert (e.k, e.dim) == (3, 7)
    assert dyn.top_eigenpairs(np.diag([2.0, 1.0]), 2).gap == 0.5  # λ_{D+1} = 0
    # the same pairs give the same residual alignment as a fresh decomposition
    r = RNG.normal(size=7)
    full = dyn.top_eigenpairs(k)
    with_eig = dyn.residual_alignment(k, r, eig=full)
    alone = dyn.residual_alignment(k, r)
    assert rel_error(with_eig.fractions, _fractions_reference(k, r)) < 1e-10
    assert rel_error(with_eig.fractions, alone.fractions) < 1e-12
    assert rel_error(dyn.residual_alignment(k, r, 2, eig=e).fractions,
                     _fractions_reference(k, r)[:2]) < 1e-10
    with pytest.raises(InputError, match="between 1 and the kernel's dimension 3"):
        dyn.residual_alignment(k, r, 4, eig=e)
    with pytest.raises(InputError, match="dimension 6"):
        dyn.residual_alignment(psd(6), RNG.normal(size=6), eig=e)
    # round-off negatives are zeroed as in the spectrum core; real ones are refused
    rank_one = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 5.0)).astype(np.float32)
    values = dyn.top_eigenpairs(rank_one).values
    assert (values >= 0).all() and rel_error(values[0], 30.0) < 1e-6
    with pytest.raises(KernelError, match="positive semi-definite"):
        dyn.top_eigenpairs(np.diag([1.0, -0.5]))


def test_a_known_layout_settles_labels_that_fit_both_readings():
    """Two labels on a 6 x 6 kernel read as the full kernel of 2 samples x 3 outputs when
    nothing says otherwise; a caller that knows the kernel is traced gets a refusal, never
    that number. The full reading equals the formula with H ⊗ I centring by hand."""
    rng = np.random.default_rng(3)
    j = rng.normal(size=(6, 4))
    k = j @ j.T
    with pytest.raises(InputError, match="traced kernel's samples"):
        dyn.target_alignment(k, np.array([0, 1]), layout="traced")
    with pytest.raises(InputError, match="traced kernel's samples"):
        dyn.residual_alignment(k, np.ones((2, 3)), layout="traced")
    y = np.eye(3)[[0, 1]].reshape(-1)  # one-hot with O = 3 classes, row i*O + o
    h = np.kron(np.eye(2) - np.ones((2, 2)) / 2, np.eye(3))
    kc, yc = h @ k @ h, h @ y
    want = float(yc @ kc @ yc) / (np.linalg.norm(kc) * float(yc @ yc))
    assert dyn.target_alignment(k, np.array([0, 1]), layout="full") == pytest.approx(want)
    assert dyn.target_alignment(k, np.array([0, 1])) == pytest.approx(want)
