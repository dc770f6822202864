"""Output axes (:mod:`cvcore.axes`) against neural-tangents' definition, in NumPy.

neural-tangents builds the whole kernel ``(N₁, X, Y, …, N₂, X, Y, …)`` and then, per
traced pair of axes, ``np.trace`` (divided by the traced size at the end), per diagonal
pair ``np.diagonal``, and zips the remaining pairs (``_trace_and_diagonal``). The
reference below does exactly that, step by step with NumPy's own trace and diagonal; the
one ``einsum`` of :func:`cvcore.axes.contract` must give the same array.
"""

from __future__ import annotations

import numpy as np
import pytest

from cvcore.axes import KernelAxes, contract, cvcore_axes, flat_full, result_shape
from cvcore.errors import InputError
from tests.tolerance import rel_error

RNG = np.random.default_rng(11)


def reference(j1: np.ndarray, j2: np.ndarray, trace: tuple[int, ...], diag: tuple[int, ...],
              mean: bool) -> np.ndarray:
    """neural-tangents' route: the whole kernel, then trace / diagonal pair by pair."""
    nd = j1.ndim - 1
    k = np.tensordot(j1, j2, axes=([nd], [nd]))  # (N1, *S, N2, *S)
    trace = tuple(sorted(a % nd for a in trace))
    diag = tuple(sorted(a % nd for a in diag))
    # pair axes (i of the first output, i of the second) as a list of labels
    labels = [("a", i) for i in range(nd)] + [("b", i) for i in range(nd)]
    size = 1
    for i in trace:
        p, q = labels.index(("a", i)), labels.index(("b", i))
        size *= k.shape[p]
        k = np.trace(k, axis1=p, axis2=q)
        labels = [lab for lab in labels if lab not in (("a", i), ("b", i))]
    for i in diag:
        p, q = labels.index(("a", i)), labels.index(("b", i))
        k = np.diagonal(k, axis1=p, axis2=q)  # the paired axis goes last
        labels = [lab for lab in labels if lab not in (("a", i), ("b", i))] + [("d", i)]
    order = []
    for i in range(nd):  # neural-tangents' layout: axis by axis, a pair or one diagonal
        if i in trace:
            continue
        if i in diag:
            order.append(labels.index(("d", i)))
        else:
            order += [labels.index(("a", i)), labels.index(("b", i))]
    k = np.transpose(k, order)
    return k / size if mean else k


CASES = [((-1,), ()), ((), ()), ((), (-1,)), ((1,), (2,)), ((1, 3), ()), ((2,), (0,)),
         ((-1, -2), (1,)), ((0,), ())]


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize(("trace", "diag"), CASES)
def test_contract_is_trace_then_diagonal(trace: tuple[int, ...], diag: tuple[int, ...],
                                         mean: bool) -> None:
    j1 = RNG.normal(size=(3, 2, 4, 3, 5))  # (N, H, W, C, P)
    j2 = RNG.normal(size=(3 if 0 in (*trace, *diag) else 2, 2, 4, 3, 5))
    axes = KernelAxes.make(trace, diag, "mean" if mean else "sum")
    got = contract(j1, j2, axes)
    want = reference(j1, j2, trace, diag, mean)
    assert got.shape == want.shape == result_shape(j1.shape[:-1], j2.shape[:-1], axes)
    assert rel_error(got, want) < 1e-12


def test_sum_over_groups_accumulates() -> None:
    """The kernel is a sum over parameter groups: contracting groups into ``out`` is
    contracting the whole Jacobian."""
    j1, j2 = RNG.normal(size=(3, 4, 6)), RNG.normal(size=(2, 4, 6))
    axes = KernelAxes.make((-1,), ())
    acc = contract(j1[..., :2], j2[..., :2], axes)
    acc = contract(j1[..., 2:], j2[..., 2:], axes, out=acc)
    assert rel_error(acc, contract(j1, j2, axes)) < 1e-13


def test_cvcore_conventions_are_cases_of_the_axes() -> None:
    j1, j2 = RNG.normal(size=(3, 2, 3, 5)), RNG.normal(size=(4, 2, 3, 5))
    traced = contract(j1, j2, cvcore_axes("traced", 3))
    assert rel_error(traced, np.einsum("ihcp,jhcp->ij", j1, j2) / 6) < 1e-13
    full = flat_full(contract(j1, j2, cvcore_axes("full", 3)), 3, 4)
    want = np.einsum("iop,jqp->iojq", j1.reshape(3, 6, 5), j2.reshape(4, 6, 5)).reshape(18, 24)
    assert rel_error(full, want) < 1e-13


def test_bad_axes_are_refused() -> None:
    j = RNG.normal(size=(2, 3, 4))
    with pytest.raises(InputError, match="within the output's 2 axes"):
        contract(j, j, KernelAxes.make((2,), ()))
    with pytest.raises(InputError, match="either traced or diagonal"):
        contract(j, j, KernelAxes.make((1,), (-1,)))
    with pytest.raises(InputError, match="distinct"):
        contract(j, j, KernelAxes.make((1, -1), ()))
    with pytest.raises(InputError, match="same per-sample shape"):
        contract(j, RNG.normal(size=(2, 2, 4)), KernelAxes.make((-1,), ()))
    with pytest.raises(InputError, match="int or a sequence"):
        KernelAxes.make("x", ())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="'mean' or 'sum'"):
        KernelAxes.make((-1,), (), "max")


@pytest.mark.parametrize(("trace", "diag"), [((), ()), ((0,), ()), ((-1,), (0,)), ((2,), ())])
def test_a_batch_axis_elsewhere_keeps_the_users_layout(trace: tuple[int, ...],
                                                        diag: tuple[int, ...]) -> None:
    """``vmap_axes`` with the batch on output axis 1: the axes count over the user's
    output ``(H, N, C)`` and the result follows its order, as neural-tangents'."""
    u1, u2 = RNG.normal(size=(2, 3, 4, 5)), RNG.normal(size=(2, 2, 4, 5))  # (H, N, C, P)
    axes = KernelAxes(trace_axes=trace, diagonal_axes=diag, batch_axis=1)
    got = contract(np.moveaxis(u1, 1, 0), np.moveaxis(u2, 1, 0), axes)
    want = reference(u1, u2, trace, diag, True)  # neural-tangents treats every axis alike
    assert got.shape == want.shape == result_shape((3, 2, 4), (2, 2, 4), axes)
    assert rel_error(got, want) < 1e-12


def test_a_kernel_too_large_for_memory_is_refused_before_the_work(monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """Output axes kept whole multiply the kernel's size: it is checked against the
    available memory (here 1 KiB) from the first group's shapes, before any contraction."""
    from cvcore import cross
    from cvcore.errors import ResourceError
    from cvcore.protocols import KernelRequest

    class Jacobians:
        name = "fake"

        def jacobians(self, model, input_sets, request):
            yield RNG.normal(size=(4, 3, 3, 2)), RNG.normal(size=(4, 3, 3, 2))

        def output_shape(self, model, inputs, request):
            return (3, 3)

    monkeypatch.setattr(cross, "available_memory", lambda: 1024)
    x = np.zeros((4, 1))
    with pytest.raises(ResourceError, match=r"shape \(4, 4, 3, 3, 3, 3\)"):
        cross.jacobian_kernel(Jacobians(), None, (x, x), KernelRequest(dtype="float64"),
                              KernelAxes.make((), ()))
    small = cross.jacobian_kernel(Jacobians(), None, (x, x), KernelRequest(dtype="float64"),
                                  KernelAxes.make((1, 2), ()))
    assert small.kernel.shape == (4, 4)
