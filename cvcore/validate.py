"""The checks made once, in front of every backend, before any backend is called.

:func:`check_call` runs in :mod:`cvcore.api` (``ntk``, ``measure``, ``build``, the
diagonal, the per-layer kernels, the Recorder) and in :func:`cvcore.estimate.estimate`
(the operator), after the model family's adapter shaped the call and before the backend
sees it, whatever the backend:

* an empty batch is refused (:func:`require_samples`, defined in :mod:`cvcore.data_io`
  beside ``batch_size``, which the probe subset uses too);
* the matrix-free operator is refused in train mode (:func:`require_eval`);
* a kernel that cannot fit in memory is refused (:func:`cvcore.memory.ensure_fits`): the
  traced kernel's size is known from ``N`` alone; the full kernel's (``N·O``) needs the
  number of outputs, which only the backend can probe, so backends call ``ensure_fits``
  once they know ``O``.

A backend called directly (``TorchBackend().ntk(...)``) makes the same checks with the
same one-line calls to these functions, so the messages are the same everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from cvcore.data_io import batch_size, require_samples
from cvcore.errors import InputError
from cvcore.memory import ensure_fits
from cvcore.protocols import KernelRequest

#: What a call asks of the backend: the kernel, its per-layer split, its diagonal, or the
#: matrix-free operator.
Capability = Literal["ntk", "layers", "diagonal", "operator"]
CAPABILITIES = ("ntk", "layers", "diagonal", "operator")


def sample_count(inputs: Any) -> int | None:
    """``N``, or ``None`` when the inputs' batch size cannot be read here (a form only the
    backend understands; the backend then says what it expected)."""
    try:
        return batch_size(inputs)
    except InputError:
        return None


def require_eval(request: KernelRequest) -> None:
    """Refuse the matrix-free operator in train mode (its products must see one kernel)."""
    if request.train:
        raise InputError("expected train=False for the matrix-free operator (batch statistics "
                         "and dropout change between products), got train=True; use method='exact'")


def check_call(inputs: Any, request: KernelRequest, capability: Capability) -> None:
    """Every check that needs no backend, for one call of ``capability``.

    Raises:
        InputError: an empty batch, or the operator with ``train=True``.
        ResourceError: a traced kernel (``ntk``, ``layers``) too large for memory.
    """
    if capability not in CAPABILITIES:
        raise InputError(f"expected a capability among {list(CAPABILITIES)}, got {capability!r}")
    if capability == "operator":
        require_eval(request)
    n = sample_count(inputs)
    if n is None:
        return
    require_samples(n)
    if capability in ("ntk", "layers") and request.kernel == "traced":
        ensure_fits(n, 1, "traced", np.dtype(request.dtype).itemsize)


__all__ = ["CAPABILITIES", "Capability", "check_call", "require_eval", "require_samples",
           "sample_count"]
