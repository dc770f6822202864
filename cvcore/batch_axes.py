"""Batch axes that are not first: neural-tangents' ``vmap_axes``, made batch-first.

cvcore's backends take the batch on the first axis of every input and of the output.
neural-tangents' ``vmap_axes`` says where it is instead: an int (the same axis for the
inputs and the output), or a triple ``(in_axes, out_axes, kwargs_axes)`` (for inputs that
are a tuple or dict, an axis per member; ``kwargs_axes`` maps a keyword argument to its
batch axis). :func:`batch_first` moves those axes to the front of NumPy inputs and asks the
backend for the model wrapped so that it takes and returns batch-first arrays
(``batch_first_model``, a backend capability of the torch and JAX backends).

Per-sample keyword arguments (neural-tangents' ``apply_fn(params, x, **kwargs)`` with a
batch axis in ``kwargs_axes``) are cvcore's dict inputs: every member is sliced by sample
and passed by name (``model(**inputs)``). Keyword arguments that are the same for every
sample are bound to the model beforehand (``functools.partial``).

``vmap_axes=None`` in neural-tangents treats the function as one of the whole batch (no
per-sample independence). cvcore measures such a function (batch norm with batch
statistics) with ``train=True``: one batched forward of the whole probe, differentiated
row by row, so ``K_ij = ∂f(X)_i/∂θ · ∂f(X)_j/∂θ`` with the statistics of the probe
batch; a kernel between two input sets has two batches' statistics and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cvcore import plugins
from cvcore.errors import BackendError, InputError
from cvcore.protocols import BatchAxesBackend


def canonical(vmap_axes: Any) -> tuple[Any, int, dict[str, int]]:
    """``(in_axes, out_axis, kwargs_axes)`` from an int or neural-tangents' triple.

    Raises:
        InputError: anything else, or ``None`` (see the module docstring).
    """
    if vmap_axes is None:
        raise InputError("expected vmap_axes as an int or (in_axes, out_axes, kwargs_axes), got "
                         "None: a function of the whole batch is measured with train=True "
                         "(one batched forward of the probe; see cvcore.batch_axes)")
    if isinstance(vmap_axes, (int, np.integer)):
        return int(vmap_axes), int(vmap_axes), {}
    if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
        in_axes, out_axis, kw = vmap_axes
        if not isinstance(out_axis, (int, np.integer)):
            raise InputError(f"expected one int out_axes (a single output), got {out_axis!r}")
        return in_axes, int(out_axis), dict(kw or {})
    raise InputError(f"expected vmap_axes as an int or (in_axes, out_axes, kwargs_axes), "
                     f"got {vmap_axes!r}")


def _move(x: Any, axis: Any) -> Any:
    """Inputs with their batch axis first (NumPy, each member by its own axis)."""
    if isinstance(x, Mapping):
        named = axis if isinstance(axis, Mapping) else dict.fromkeys(x, axis)
        return {k: _move(v, named.get(k, 0)) for k, v in x.items()}
    if isinstance(x, tuple):
        each = axis if isinstance(axis, (tuple, list)) else (axis,) * len(x)
        return tuple(_move(v, a) for v, a in zip(x, each))
    if axis in (0, None):
        return x
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception:  # noqa: BLE001 - reported as one line
            raise InputError(f"expected NumPy inputs with vmap_axes, got {type(x).__name__}") from None
    return np.moveaxis(x, int(axis), 0)


def _in_axes(x: Any, in_axes: Any, kw: dict[str, int]) -> Any:
    if isinstance(x, Mapping):
        base = in_axes if isinstance(in_axes, Mapping) else dict.fromkeys(x, in_axes)
        return {k: kw.get(k, base.get(k, 0)) for k in x}
    return in_axes


def is_trivial(vmap_axes: Any) -> bool:
    """Whether ``vmap_axes`` says the batch is first everywhere."""
    if isinstance(vmap_axes, (int, np.integer)):
        return int(vmap_axes) == 0
    if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
        in_axes, out_axis, kw = vmap_axes
        flat = list(in_axes.values()) if isinstance(in_axes, Mapping) else \
            list(in_axes) if isinstance(in_axes, (tuple, list)) else [in_axes]
        return all(a in (0, None) for a in flat) and out_axis == 0 and \
            all(a == 0 for a in (kw or {}).values())
    return False


def output_axis(vmap_axes: Any) -> int:
    """The output's batch axis ``vmap_axes`` names (``0`` when trivial): the axis
    :class:`cvcore.axes.KernelAxes` counts the user's output axes around."""
    return 0 if is_trivial(vmap_axes) else canonical(vmap_axes)[1]


def batch_first(model: Any, inputs: Any, x2: Any, vmap_axes: Any, backend: str | None
                ) -> tuple[Any, Any, Any]:
    """The model, inputs and second input set with every batch axis first.

    Raises:
        InputError: ``vmap_axes`` malformed, or inputs that are not NumPy-convertible.
        BackendError: the model's backend cannot wrap a model (no ``batch_first_model``).
    """
    if is_trivial(vmap_axes):
        return model, inputs, x2
    in_axes, out_axis, kw = canonical(vmap_axes)
    axes = _in_axes(inputs, in_axes, kw)
    moved = _move(inputs, axes)
    moved2 = None if x2 is None else _move(x2, _in_axes(x2, in_axes, kw))
    chosen = plugins.get_backend(backend) if backend else plugins.select_backend(model)
    if not isinstance(chosen, BatchAxesBackend):
        raise BackendError(f"expected a backend that can move a model's batch axis "
                           f"(batch_first_model), got {chosen.name!r}; move the axis in the "
                           "model and use vmap_axes=0")
    return chosen.batch_first_model(model, axes, out_axis), moved, moved2


__all__ = ["batch_first", "canonical", "is_trivial", "output_axis"]
