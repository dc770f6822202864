"""Choosing one output of a model that returns several, and refusing outputs or gradients
that are not finite, the same way in every backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cvcore.errors import ModelError, describe
from cvcore.protocols import OutputSelector


def output_choices(raw: Any) -> str:
    """Describe what a raw output offers to ``output=``.

    >>> output_choices((1, 2))
    'a tuple of 2 items (indices 0..1)'
    >>> output_choices({"logits": 1, "hidden": 2})
    "a mapping with keys ['logits', 'hidden']"
    """
    if isinstance(raw, Mapping):
        return f"a mapping with keys {list(raw.keys())}"
    if dataclasses.is_dataclass(raw):
        return f"a dataclass with fields {[f.name for f in dataclasses.fields(raw)]}"
    if isinstance(raw, (tuple, list)):
        return f"a {type(raw).__name__} of {len(raw)} items (indices 0..{len(raw) - 1})"
    return describe(raw)


def select_output(raw: Any, output: OutputSelector | None, *, is_leaf: Callable[[Any], bool],
                  noun: str = "tensor") -> Any:
    """Pick one array out of a model's raw output (array, tuple / list, dict or dataclass).

    Args:
        raw: what the model returned.
        output: ``None`` (the output must be one array, or a container of exactly one), an
            index, a key or attribute name, or a callable applied to ``raw``.
        is_leaf: whether a value is an array of the backend's framework.
        noun: what the framework calls an array, for messages.

    Raises:
        ModelError: the output cannot be chosen; the message lists the choices.
    """
    if output is None:
        if is_leaf(raw):
            return raw
        if isinstance(raw, (tuple, list, Mapping)) and len(raw) == 1:
            only = next(iter(raw.values())) if isinstance(raw, Mapping) else raw[0]
            if is_leaf(only):
                return only
        raise ModelError(
            f"expected the model to return one {noun}, got {output_choices(raw)}; "
            "pass output= (an index, a key, or a callable) to choose one"
        )
    if callable(output):
        picked = output(raw)
    elif isinstance(output, int) and not isinstance(output, bool):
        if not isinstance(raw, (tuple, list)):
            raise ModelError(f"expected a tuple output for output={output}, got {output_choices(raw)}")
        if not -len(raw) <= output < len(raw):
            raise ModelError(f"expected output index below {len(raw)}, got {output}")
        picked = raw[output]
    elif isinstance(raw, Mapping) and output in raw:
        picked = raw[output]
    elif not isinstance(raw, Mapping) and isinstance(output, str) and hasattr(raw, output):
        picked = getattr(raw, output)
    else:
        raise ModelError(f"expected output= one of {output_choices(raw)}, got {output!r}")
    if not is_leaf(picked):
        raise ModelError(f"expected the selected output to be a {noun}, got {describe(picked)}")
    return picked


def describe_inputs(x: Any) -> str:
    """Per-sample shapes of a batch (or a dict / tuple of batches), for error messages.

    >>> import numpy as np
    >>> describe_inputs(np.zeros((3, 5), dtype=np.float32))
    'a batch of per-sample shape (5,) (float32)'
    """
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {describe_inputs(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in x) + ")"
    return f"a batch of per-sample shape {tuple(x.shape[1:])} ({x.dtype})"


def check_finite(diagonal: ArrayLike, n: int, width: int) -> None:
    """Raise naming the samples whose outputs or gradients are NaN or Inf.

    Args:
        diagonal: the kernel's diagonal as NumPy, ``n · width`` values in row order
            (``width`` is 1 for the traced kernel, ``O`` for the full one), any shape.
        n: the number of samples.
        width: rows per sample.

    Raises:
        ModelError: some value is NaN or Inf.

    >>> check_finite([1.0, 2.0, 3.0, 4.0], n=2, width=2)
    >>> check_finite([1.0, 2.0, float("nan"), 4.0], n=2, width=2)
    Traceback (most recent call last):
    ...
    cvcore.errors.ModelError: expected finite outputs and gradients, got NaN/Inf for 1 of 2 samples (indices 1)
    """
    bad = np.flatnonzero(~np.isfinite(np.asarray(diagonal).reshape(-1)))
    if bad.size:
        samples = sorted({int(i) // width for i in bad})
        shown = ", ".join(map(str, samples[:10])) + (" ..." if len(samples) > 10 else "")
        raise ModelError(
            f"expected finite outputs and gradients, got NaN/Inf for {len(samples)} of {n} "
            f"samples (indices {shown})"
        )
