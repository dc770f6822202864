"""JAX: an Optax / Flax NNX loop records through :class:`cvcore.Recorder` itself.

The Recorder takes ``(apply_fn, params)`` or an ``nnx.Module`` as they are at each step::

    rec = cvcore.Recorder(x_probe, sink="run.db", every=10)
    for step in range(steps):
        rec.record(step, (apply_fn, params), loss=loss)   # or rec.record(step, nnx_model)
        params, opt_state, loss = train_step(params, opt_state, batch)

After the loop, ``record_final(rec, steps, (apply_fn, params), loss=loss)``
(:func:`cvcore.integrations.recording.record_final`) records the final model whatever
``every`` says. A graph network written in JAX on a fixed graph records with node indices
as its probe (``apply_fn(params, idx)`` returning those nodes' rows, computed on the
whole graph); PyTorch Geometric ``Data`` probes are for PyTorch modules.

The backend's jitted Jacobian functions are cached by the model's code and the probe's
shapes, so new parameter values reuse them: only the first record compiles.
:func:`compilations` counts XLA compilations, to check that in one's own loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cvcore.integrations.common import require

INSTALL = "jax"
#: The monitoring event JAX emits once per XLA backend compilation.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
#: The event JAX emits once per trace of a Python function to a jaxpr.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@dataclass
class Compilations:
    """XLA compilations and jaxpr traces seen inside :func:`compilations`."""

    compiled: int = 0
    traced: int = 0
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)


@contextlib.contextmanager
def compilations() -> Iterator[Compilations]:
    """Count JAX's compilations (and traces) in the body, through ``jax.monitoring``.

    >>> with compilations() as seen:          # doctest: +SKIP
    ...     rec.record(step, (apply_fn, params))
    >>> seen.compiled                          # doctest: +SKIP
    0
    """
    monitoring = require("jax.monitoring", INSTALL)
    seen = Compilations()

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            seen.compiled += 1
            seen.seconds += duration
        elif event == TRACE_EVENT:
            seen.traced += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listener)
