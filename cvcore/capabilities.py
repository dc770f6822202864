"""The framework chores the core asks of backends, each with a NumPy default.

Seeding, guarding a training run's state, counting parameters and turning a NumPy array
into a framework's array need a framework; the core never imports one. It asks the
registered backends through the optional capabilities of :mod:`cvcore.protocols`
(:class:`~cvcore.protocols.SeedingBackend`, :class:`~cvcore.protocols.GuardingBackend`,
:class:`~cvcore.protocols.CountingBackend`, :class:`~cvcore.protocols.ArrayBackend`), so a
third-party backend takes part like a built-in one. Taking rows of inputs is
:func:`cvcore.data_io.take` (with :class:`~cvcore.protocols.TakingBackend`).

A backend is asked only when one of its framework's modules is already in
``sys.modules``: a framework that is not imported has no state to seed or protect.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore import plugins
from cvcore.errors import BackendError, CVCoreError, ModelError
from cvcore.protocols import (
    ArrayBackend,
    CountingBackend,
    GuardingBackend,
    KernelRequest,
    NamingBackend,
    OutputsBackend,
    SeedingBackend,
)


def imported_backends() -> list[Any]:
    """The registered backends whose framework is already imported, in registration order."""
    return [b for b in plugins.registry().backends.values()
            if any(m in sys.modules for m in getattr(b, "modules", ()))]


def seed_frameworks(seed: int) -> None:
    """Seed the random generators of the frameworks already imported (dropout under
    ``train=True``), never importing one to do so: each imported backend's
    :meth:`~cvcore.protocols.SeedingBackend.seed`."""
    for backend in imported_backends():
        if isinstance(backend, SeedingBackend):
            backend.seed(seed)


@contextlib.contextmanager
def untouched(model: Any) -> Iterator[None]:
    """Run the body and restore what a measurement could change in a training run.

    Restored afterwards: Python's and NumPy's global random states (here), and whatever
    each imported backend's :meth:`~cvcore.protocols.GuardingBackend.guard` restores
    (torch: its CPU and initialised CUDA generators, grad mode, every submodule's
    train/eval flag and every parameter's ``.grad`` and ``requires_grad``).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with contextlib.ExitStack() as stack:
        for backend in imported_backends():
            if isinstance(backend, GuardingBackend):
                stack.enter_context(backend.guard(model))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def count_parameters(model: Any, backend: Any) -> int | None:
    """Trainable parameters of ``model`` when ``backend`` can tell them cheaply
    (:class:`~cvcore.protocols.CountingBackend`), else ``None``."""
    if isinstance(backend, CountingBackend):
        return backend.count_parameters(model)
    return None


def as_array(values: NDArray[Any], like: Any, backend: Any = None) -> Any:
    """``values`` as an array of ``like``'s framework, dtype and device: ``backend``'s
    :meth:`~cvcore.protocols.ArrayBackend.as_array`, else NumPy in ``like``'s dtype."""
    if not isinstance(like, np.ndarray) and isinstance(backend, ArrayBackend):
        return backend.as_array(values, like)
    return np.asarray(values, dtype=getattr(like, "dtype", np.float64))


def model_outputs(backend: Any, model: Any, inputs: Any, request: KernelRequest
                  ) -> NDArray[np.float64]:
    """The outputs ``f(x)`` the kernel of ``request`` differentiates, ``(N, O)`` float64:
    ``backend``'s :meth:`~cvcore.protocols.OutputsBackend.outputs` (no NumPy default: only
    the framework can run the model).

    Raises:
        BackendError: the backend cannot compute outputs.
        ModelError: it returned something other than ``N`` finite rows.
    """
    if not isinstance(backend, OutputsBackend):
        raise BackendError(f"expected a backend that computes the model's outputs, got "
                           f"{getattr(backend, 'name', type(backend).__name__)!r}, which has "
                           "no outputs()")
    out = np.asarray(backend.outputs(model, inputs, request), dtype=np.float64)
    if out.ndim != 2:
        raise ModelError(f"backend returned outputs of shape {out.shape}, expected (N, O)")
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise ModelError(f"expected finite outputs, got NaN/Inf for {bad.size} of {out.shape[0]} "
                         f"samples (indices {', '.join(map(str, bad[:10].tolist()))})")
    return out


__all__ = ["as_array", "count_parameters", "imported_backends", "model_outputs",
           "seed_frameworks", "untouched"]


def framework_name(model: Any, backend: str) -> str:
    """The framework ``model`` is in, as a run stores it: what the backend named ``backend``
    says (:class:`~cvcore.protocols.NamingBackend`), else that name."""
    try:
        found = plugins.get_backend(backend)
    except CVCoreError:
        return backend
    return found.framework(model) if isinstance(found, NamingBackend) else backend
