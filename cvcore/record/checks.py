"""What a Recorder checks and derives per record, apart from measuring: the step and the
loss it is given, zero kernels, and the summary of its costs."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cvcore.errors import InputError, describe

#: The largest step a record can hold: steps are SQLite integers (signed 64-bit).
MAX_STEP = 2**63 - 1
#: The variables a zero kernel still defines (every other one is undefined: NaN).
ZERO_DEFINED = ("trace", "normalized_trace")


def check_step(step: Any) -> int:
    """A training step as a Python int in ``[0, 2^63)``, the range the store can hold.

    >>> check_step(7)
    7
    >>> check_step(-1)
    Traceback (most recent call last):
    ...
    cvcore.errors.InputError: expected step= an integer from 0 to 2^63 - 1, got -1
    """
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise InputError(f"expected step= an integer from 0 to 2^63 - 1, got {describe(step)}")
    value = int(step)
    if not 0 <= value <= MAX_STEP:
        raise InputError(f"expected step= an integer from 0 to 2^63 - 1, got {value}")
    return value


def check_loss(loss: Any) -> None:
    """Refuse a loss that is not one number (a vector loss, a string, a bool) without
    reading its value (so a loss on a GPU is not synchronised at skipped steps)."""
    if loss is None:
        return
    if isinstance(loss, (str, bytes, bool, np.bool_)):
        raise InputError(f"expected loss= a number or a one-element tensor, got {describe(loss)}")
    numel = getattr(loss, "numel", None)
    size = numel() if callable(numel) else getattr(loss, "size", None)
    if not isinstance(size, (int, np.integer)):
        shape = getattr(loss, "shape", None)
        size = None if shape is None else int(np.prod(tuple(shape), dtype=np.int64))
    if size is not None and int(size) != 1:
        raise InputError(f"expected loss= a number or a one-element tensor, got "
                         f"{describe(loss)} ({int(size)} elements); pass its mean, e.g. "
                         "loss.mean()")


def loss_value(loss: Any) -> float | None:
    """The loss as a Python float (NaN and Inf kept: the store keeps NaN as missing)."""
    check_loss(loss)
    if loss is None:
        return None
    item = getattr(loss, "item", None)
    number = item() if callable(item) else loss
    try:
        return float(number)
    except (TypeError, ValueError):
        raise InputError(f"expected loss= a number or a one-element tensor, got "
                         f"{describe(loss)}") from None


def is_zero_kernel(matrix: Any) -> bool:
    """Whether a kernel (or its diagonal) is exactly zero: the model's outputs do not
    depend on its parameters on these samples, so only the trace is defined."""
    arr = np.asarray(matrix)
    diag = np.diagonal(arr) if arr.ndim == 2 else arr
    return arr.size > 0 and not np.any(diag) and bool(np.isfinite(arr).all()) \
        and not np.any(arr)


def zero_kernel_note(places: Sequence[str]) -> str:
    """The note a record keeps about its zero kernels (the words of :func:`cvcore.measure`'s
    refusal, as the Recorder records instead of refusing)."""
    return (f"zero kernel on {', '.join(places)}: trace 0 (the model's outputs do not depend "
            "on its parameters here); the entropy is undefined, stored as missing")


def zero_kernel_values(names: Sequence[str]) -> dict[str, float]:
    """The variables of a zero kernel: trace 0 and normalized trace 0; the entropies, the
    effective rank and the magnitude variance are undefined (NaN, stored as missing)."""
    return {v: 0.0 if v in ZERO_DEFINED else math.nan for v in names}


def cost_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Count, total, mean, median and max of per-record seconds (NaN when empty)."""
    arr = np.asarray(seconds, dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "total": 0.0, "mean": math.nan, "median": math.nan, "max": math.nan}
    return {"count": int(arr.size), "total": float(arr.sum()), "mean": float(arr.mean()),
            "median": float(np.median(arr)), "max": float(arr.max())}


def _alive(pid: int) -> bool:
    """Whether a process of this host is running (a resume refuses a run it writes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
