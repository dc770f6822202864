"""neural-tangents' empirical-kernel names over cvcore, for porting code that used them.

``import cvcore.nt as nt`` and the calls below keep their neural-tangents signatures and
layouts (``trace_axes=(-1,)`` averaged, ``diagonal_axes=()``, ``vmap_axes=0``), on a
model of any cvcore backend. ``f`` is neural-tangents' ``apply_fn(params, x)`` (a JAX
function; the model is ``(f, params)``), or, for PyTorch and Keras, the model itself with
``params=None``. Keyword arguments of the apply function (``**apply_fn_kwargs``) are
bound to it for both input sets (per-sample ones are cvcore dict inputs; see
docs/neural-tangents.md).

========================================  ==============================================
neural-tangents                           cvcore
========================================  ==============================================
``empirical_ntk_fn(f, ...)(x1, x2, p)``   ``cvcore.ntk((f, p), x1, x2, trace_axes=...)``
``empirical_nngp_fn(f, ...)(x1, x2, p)``  ``cvcore.nngp((f, p), x1, x2, trace_axes=...)``
``empirical_kernel_fn(f)(x1, x2, get, p)`` the two above
``empirical_ntk_vp_fn(f, x1, x2, p)(ct)`` ``cvcore.kernel_vector_product(m, x1, ct, x2, kernel="full")``
``predict.gradient_descent_mse(...)``     ``cvcore.gradient_descent_mse(...)`` (same conventions)
========================================  ==============================================
"""

from __future__ import annotations

import enum
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore import predict
from cvcore.api import ntk
from cvcore.errors import InputError
from cvcore.kvp import kernel_vector_product
from cvcore.nngp import nngp


class NtkImplementation(enum.IntEnum):
    """neural-tangents' implementation names; cvcore chooses its own path (the structured
    rules for a self kernel in its conventions, else the Jacobian path): every value
    gives the same kernel."""

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


Kernel = namedtuple("Kernel", ["nngp", "ntk"])


def _model(f: Any, params: Any, kwargs: dict[str, Any]) -> Any:
    """The cvcore model for neural-tangents' ``(f, params)``: the pair (``f`` bound to
    ``kwargs``), or ``f`` itself when ``params`` is ``None`` (a torch or Keras model)."""
    if params is None:
        if kwargs:
            raise InputError(f"expected no apply_fn keyword arguments for a model object, got "
                             f"{sorted(kwargs)}; bind them to the model")
        return f
    if not kwargs:
        return (f, params)

    def bound(p: Any, x: Any) -> Any:
        return f(p, x, **kwargs)

    return (bound, params)


def empirical_ntk_fn(f: Any, trace_axes: int | Sequence[int] = (-1,),
                     diagonal_axes: int | Sequence[int] = (), vmap_axes: Any = 0,
                     implementation: int = NtkImplementation.JACOBIAN_CONTRACTION,
                     **cvcore_options: Any) -> Callable[..., NDArray[np.floating[Any]]]:
    """``ntk_fn(x1, x2, params, **apply_fn_kwargs)`` as neural-tangents returns it
    (``x2=None``: ``x1`` with itself); ``cvcore_options`` go to :func:`cvcore.ntk`
    (``dtype="float64"``, ``device=``, ...)."""
    NtkImplementation(int(implementation))  # neural-tangents' values only

    def ntk_fn(x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> NDArray[np.floating[Any]]:
        return ntk(_model(f, params, apply_fn_kwargs), x1, x2, trace_axes=trace_axes,
                   diagonal_axes=diagonal_axes, vmap_axes=vmap_axes, **cvcore_options)

    return ntk_fn


def empirical_nngp_fn(f: Any, trace_axes: int | Sequence[int] = (-1,),
                      diagonal_axes: int | Sequence[int] = (),
                      **cvcore_options: Any) -> Callable[..., NDArray[np.float64]]:
    """``nngp_fn(x1, x2, params, **apply_fn_kwargs)``: the outputs' Gram matrix."""

    def nngp_fn(x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> NDArray[np.float64]:
        return nngp(_model(f, params, apply_fn_kwargs), x1, x2, trace_axes=trace_axes,
                    diagonal_axes=diagonal_axes, **cvcore_options)

    return nngp_fn


def empirical_kernel_fn(f: Any, trace_axes: int | Sequence[int] = (-1,),
                        diagonal_axes: int | Sequence[int] = (), vmap_axes: Any = 0,
                        implementation: int = NtkImplementation.JACOBIAN_CONTRACTION,
                        **cvcore_options: Any) -> Callable[..., Any]:
    """``kernel_fn(x1, x2, get, params, **apply_fn_kwargs)``: ``get`` is ``"ntk"``,
    ``"nngp"`` or a tuple of them (then a ``Kernel`` namedtuple-like tuple)."""
    ntk_fn = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation,
                              **cvcore_options)
    nngp_fn = empirical_nngp_fn(f, trace_axes, diagonal_axes, **cvcore_options)

    def kernel_fn(x1: Any, x2: Any, get: str | tuple[str, ...] | None, params: Any,
                  **apply_fn_kwargs: Any) -> Any:
        names = ("nngp", "ntk") if get is None else (get,) if isinstance(get, str) else tuple(get)
        unknown = [g for g in names if g not in ("nngp", "ntk")]
        if unknown:
            raise InputError(f"expected get among 'nngp', 'ntk', got {unknown}")
        fns = {"nngp": nngp_fn, "ntk": ntk_fn}
        values = {g: fns[g](x1, x2, params, **apply_fn_kwargs) for g in names}
        if isinstance(get, str):
            return values[get]
        if get is None:
            return Kernel(values["nngp"], values["ntk"])
        return tuple(values[g] for g in names)

    return kernel_fn


def empirical_ntk_vp_fn(f: Any, x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any
                        ) -> Callable[[Any], NDArray[np.float64]]:
    """``ntk_vp_fn(cotangents)``: the full NTK ``K(x1, x2)`` times cotangents shaped like
    ``f(params, x2)``, shaped like ``f(params, x1)``; the kernel is never formed."""
    model = _model(f, params, apply_fn_kwargs)

    def ntk_vp_fn(cotangents: Any) -> NDArray[np.float64]:
        return kernel_vector_product(model, x1, cotangents, x2, kernel="full")

    return ntk_vp_fn


__all__ = ["Kernel", "NtkImplementation", "empirical_kernel_fn", "empirical_nngp_fn",
           "empirical_ntk_fn", "empirical_ntk_vp_fn", "predict"]
