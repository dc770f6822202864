"""Which output axes of a kernel are traced, kept diagonal, or kept whole: :class:`KernelAxes`.

A model's output for a batch has the shape ``(N, *S)``: the batch axis ``0`` and the
per-sample output axes ``S``. A kernel between two batches pairs every axis of the first
output with the same axis of the second. neural-tangents names three fates for a pair of
axes, and cvcore takes the same names (``trace_axes``, ``diagonal_axes``), counted over
the whole output ``(N, *S)`` as neural-tangents counts them (``-1`` is the last output
axis, ``0`` the batch axis):

* traced: only ``Σ_a K[..a.., ..a..]`` is kept, reduced by ``reduction``: ``"mean"``
  divides by the product of the traced sizes (neural-tangents' convention: its
  ``_trace_and_diagonal`` returns ``ntk / contract_size``, and ``empirical_nngp_fn``
  divides by the same size), ``"sum"`` does not;
* diagonal: only ``K[..a.., ..a..]`` is kept, one axis in the result;
* kept: both axes are in the result, side by side (``a₁, a₂``).

The result's layout is neural-tangents': ``(N₁, N₂)`` (or ``N`` when the batch axis is
diagonal) followed by every other non-traced output axis in order, a pair for a kept axis
and one axis for a diagonal one. cvcore's own conventions are two cases of it:
``traced`` is every per-sample axis traced with ``"mean"`` (then reshaped nothing: it is
already ``N₁ × N₂``), ``full`` is nothing traced (then laid out as ``(N₁·O) × (N₂·O)``,
row ``i·O + o``, by :func:`flat_full`).

Everything here is NumPy on arrays the backends computed; :func:`contract` is the one
einsum every kernel of this module family goes through (NTK from Jacobians with a trailing
parameter axis, NNGP from outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError

Reduction = Literal["mean", "sum"]
REDUCTIONS = ("mean", "sum")
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _as_axes(value: int | Sequence[int] | None, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    try:
        axes = tuple(int(a) for a in value)
    except (TypeError, ValueError):
        raise InputError(f"expected {name} as an int or a sequence of ints, got {value!r}") from None
    if any(not isinstance(a, (int, np.integer)) for a in value):
        raise InputError(f"expected {name} as an int or a sequence of ints, got {value!r}")
    return axes


@dataclass(frozen=True)
class KernelAxes:
    """The fate of each output axis in a kernel (see the module docstring).

    Attributes:
        trace_axes: output axes (over ``(N, *S)``, negative from the end) that are traced.
        diagonal_axes: output axes of which only the diagonal is kept.
        reduction: ``"mean"`` (neural-tangents; cvcore's ``traced``) or ``"sum"`` over
            the traced axes.
        batch_axis: where the batch axis is in the user's output (neural-tangents'
            ``vmap_axes`` output axis): the axes above count over that layout, and the
            result's axes follow it, as neural-tangents' do. The arrays :func:`contract`
            receives are batch-first whatever it is.
    """

    trace_axes: tuple[int, ...] = (-1,)
    diagonal_axes: tuple[int, ...] = ()
    reduction: Reduction = "mean"
    batch_axis: int = 0

    @classmethod
    def make(cls, trace_axes: int | Sequence[int] | None = (-1,),
             diagonal_axes: int | Sequence[int] | None = (),
             reduction: str = "mean") -> KernelAxes:
        """Checked: ints, no axis both traced and diagonal, a known reduction."""
        if reduction not in REDUCTIONS:
            raise InputError(f"expected trace_reduction 'mean' or 'sum', got {reduction!r}")
        t, d = _as_axes(trace_axes, "trace_axes"), _as_axes(diagonal_axes, "diagonal_axes")
        return cls(trace_axes=t, diagonal_axes=d, reduction=reduction)  # type: ignore[arg-type]

    def canonical(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The traced and diagonal axes as non-negative indices into the batch-first
        ``ndim``-axis output ``(N, *S)``.

        Raises:
            InputError: an axis out of range, repeated, or both traced and diagonal.
        """
        out = []
        for name, axes in (("trace_axes", self.trace_axes), ("diagonal_axes", self.diagonal_axes)):
            canon = []
            for a in axes:
                if not -ndim <= a < ndim:
                    raise InputError(f"expected {name} within the output's {ndim} axes "
                                     f"(batch axis included), got {a}")
                canon.append(self.batch_first(a % ndim, ndim))
            if len(set(canon)) != len(canon):
                raise InputError(f"expected distinct {name}, got {axes}")
            out.append(tuple(sorted(canon)))
        both = set(out[0]) & set(out[1])
        if both:
            raise InputError(f"expected an axis either traced or diagonal, got axis "
                             f"{sorted(both)} in both trace_axes and diagonal_axes")
        return out[0], out[1]

    def batch_first(self, axis: int, ndim: int) -> int:
        """The position of the user's output axis ``axis`` once the batch axis is first."""
        b = self.batch_axis % ndim
        return 0 if axis == b else axis + 1 if axis < b else axis

    def user_axis(self, position: int, ndim: int) -> int:
        """The user's output axis at batch-first ``position`` (the inverse)."""
        b = self.batch_axis % ndim
        return b if position == 0 else position - 1 if position <= b else position

    def describe(self) -> str:
        """The convention in words, for every output that carries a kernel."""
        t = ", ".join(str(a) for a in self.trace_axes) or "none"
        d = ", ".join(str(a) for a in self.diagonal_axes) or "none"
        return f"trace_axes=({t}) {self.reduction}, diagonal_axes=({d})"


#: cvcore's ``traced`` convention for a flat output: the last axis averaged.
TRACED = KernelAxes((-1,), (), "mean")
#: cvcore's ``full`` convention: nothing traced.
FULL = KernelAxes((), (), "mean")


def result_shape(shape1: tuple[int, ...], shape2: tuple[int, ...], axes: KernelAxes
                 ) -> tuple[int, ...]:
    """The kernel's shape for outputs of shapes ``(N₁, *S)`` and ``(N₂, *S)``."""
    ndim = len(shape1)
    trace, diag = axes.canonical(ndim)
    groups = []
    for i, (a, b) in enumerate(zip(shape1, shape2)):
        if i in trace:
            continue
        groups.append((axes.user_axis(i, ndim), [a] if i in diag else [a, b]))
    return tuple(d for _, dims in sorted(groups) for d in dims)


def contract(f1: NDArray[Any], f2: NDArray[Any], axes: KernelAxes, extra: int = 1,
             out: NDArray[Any] | None = None) -> NDArray[Any]:
    """``Σ`` over the traced axes and the last ``extra`` axes (the parameters) of
    ``f1 ⊗ f2``, diagonal axes paired, kept axes side by side (neural-tangents' layout).

    ``f1`` is ``(N₁, *S, *E)``, ``f2`` ``(N₂, *S, *E)`` with ``E`` the ``extra`` trailing
    axes summed over (a Jacobian's parameter axis; ``extra=0`` for outputs). The traced
    sum is divided by the traced size when ``axes.reduction`` is ``"mean"``. With
    ``out``, the result is added into it (a sum over parameter groups).

    Raises:
        InputError: the two outputs' shapes differ where they are paired (a traced or
            diagonal axis, or the per-sample axes at all), or more axes than letters.
    """
    ndim = f1.ndim - extra
    if f2.ndim != f1.ndim or f1.shape[1:] != f2.shape[1:]:
        raise InputError(f"expected two outputs with the same per-sample shape, got "
                         f"{f1.shape[1:ndim]} and {f2.shape[1:f2.ndim - extra]}")
    trace, diag = axes.canonical(ndim)
    if f1.shape[0] != f2.shape[0] and 0 in (*trace, *diag):
        raise InputError(f"expected two batches of one size when the batch axis is traced or "
                         f"diagonal, got {f1.shape[0]} and {f2.shape[0]}")
    if 2 * ndim + extra > len(_LETTERS):
        raise InputError(f"expected at most {(len(_LETTERS) - extra) // 2} output axes, got {ndim}")
    left = list(_LETTERS[:ndim])
    right = list(_LETTERS[ndim:2 * ndim])
    params = _LETTERS[2 * ndim:2 * ndim + extra]
    groups = []
    for i in range(ndim):
        if i in trace:
            right[i] = left[i]
        elif i in diag:
            right[i] = left[i]
            groups.append((axes.user_axis(i, ndim), [left[i]]))
        else:
            groups.append((axes.user_axis(i, ndim), [left[i], right[i]]))
    result = [letter for _, letters in sorted(groups) for letter in letters]
    spec = f"{''.join(left)}{params},{''.join(right)}{params}->{''.join(result)}"
    k = np.einsum(spec, f1, f2, optimize=True)
    if axes.reduction == "mean" and trace:
        k = k / float(np.prod([f1.shape[i] for i in trace]))
    if out is not None:
        out += k
        return out
    return np.asarray(k)


def flat_full(k: NDArray[Any], n1: int, n2: int) -> NDArray[Any]:
    """A nothing-traced kernel in neural-tangents' layout ``(N₁, N₂, S₁, S'₁, S₂, S'₂ …)``
    as cvcore's full kernel ``(N₁·O) × (N₂·O)``, row ``i·O + o`` (``o`` row-major over S)."""
    rest = k.ndim - 2
    order = [0, *range(2, 2 + rest, 2), 1, *range(3, 2 + rest, 2)]
    moved = np.transpose(k, order)
    return moved.reshape(n1 * int(np.prod(moved.shape[1:1 + rest // 2], dtype=np.int64)), -1)


def cvcore_axes(kernel: str, ndim: int) -> KernelAxes:
    """cvcore's ``traced`` / ``full`` convention as :class:`KernelAxes` for an output
    with ``ndim`` axes (batch included): every per-sample axis averaged, or none."""
    if kernel == "traced":
        return KernelAxes(tuple(range(1, ndim)), (), "mean")
    return KernelAxes((), (), "mean")


__all__ = ["FULL", "REDUCTIONS", "TRACED", "KernelAxes", "Reduction", "contract",
           "cvcore_axes", "flat_full", "result_shape"]
