"""One measurement asked for, as one typed value: :class:`MeasureRequest`.

Every entry point builds one: :func:`cvcore.measure` and :func:`cvcore.ntk`, ``cv measure``
(through :func:`cvcore.runs.measure_checkpoints`), the :class:`~cvcore.record.Recorder`
(and so the sweep, whose cells record with it). It is validated once
(:func:`cvcore.validate.measure_request`), resolved once into a
:class:`cvcore.plan.MeasurePlan`, and what it computes is decided in one place,
:attr:`MeasureRequest.compute`.

:class:`Options` is the one list of measure options as a user writes them: the keyword
parameters of :func:`cvcore.ntk` and :func:`cvcore.measure` are checked against its
fields by a test, and the Recorder accepts them by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from cvcore.axes import KernelAxes
from cvcore.errors import InputError
from cvcore.estimators import (
    DEFAULT_ALIGNMENT_PROBES,
    DEFAULT_OVERSAMPLE,
    DEFAULT_POWER_ITERS,
    DEFAULT_PROBES,
    DEFAULT_STEPS,
    DEFAULT_TOP_K,
    Seed,
)
from cvcore.protocols import Implementation, KernelRequest, OutputSelector
from cvcore.spectrum import DIAGONAL_VARIABLES

METHODS = ("auto", "exact", "stochastic")
TRACE_ESTIMATORS = ("auto", "diagonal", "hutchinson")


@dataclass(frozen=True)
class Options:
    """The measure options as a user writes them, not yet checked (the one list).

    See :func:`cvcore.ntk` for each one; :func:`cvcore.validate.make_request` turns all
    but ``backend`` into a :class:`~cvcore.protocols.KernelRequest`.
    """

    kernel: str = "traced"
    backend: str | None = None
    output: OutputSelector | None = None
    dtype: str | None = None
    device: str | None = None
    train: bool = False
    memory_budget: str | int | None = None
    implementation: str | Implementation = Implementation.AUTO
    family: str | None = None
    verify: bool = False

    def kernel_options(self) -> dict[str, Any]:
        """Every option but ``backend``: the keywords of
        :func:`cvcore.validate.make_request`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "backend"}


def option_names() -> tuple[str, ...]:
    """The names of the measure options (:class:`Options`' fields), in order."""
    return tuple(f.name for f in fields(Options))


#: What else :func:`cvcore.measure` takes besides :class:`Options`: what to compute.
MEASURE_ONLY = ("variables", "per_layer", "targets")

#: What else :func:`cvcore.ntk` takes besides :class:`Options` (keyword-only): which
#: output axes are traced or kept diagonal (:class:`cvcore.axes.KernelAxes`) and where
#: the batch axis is (``vmap_axes``). Its second input set ``x2`` is positional.
NTK_ONLY = ("trace_axes", "diagonal_axes", "trace_reduction", "vmap_axes")


@dataclass(frozen=True, eq=False)
class Targets:
    """The probe's targets, checked once (:func:`cvcore.validate.check_targets`): what the
    kernel's alignment and the residual ``f(x) − y`` are measured against.

    Attributes:
        values: integer class labels ``(N,)`` (int64; one-hot encoded where used), or real
            targets ``(N, C)`` (float64; a 1-D real target is one column).
        labels: whether ``values`` are class labels.
    """

    values: np.ndarray[Any, Any]
    labels: bool

    @property
    def n(self) -> int:
        """``N``, the number of samples the targets are for."""
        return int(self.values.shape[0])


@dataclass(frozen=True)
class EstimatorOptions:
    """The estimator's settings, checked once when made (what :func:`cvcore.estimate`
    takes as keywords, and ``cv measure --method`` builds). See :func:`cvcore.estimate`
    for each one.

    Raises:
        InputError: ``method``, ``trace_estimator`` or ``top_k`` is invalid (the counts of
            probes and steps are checked by the estimators, which use them).
    """

    method: str = "auto"
    probes: int = DEFAULT_PROBES
    steps: int = DEFAULT_STEPS
    top_k: int = DEFAULT_TOP_K
    oversample: int = DEFAULT_OVERSAMPLE
    power_iters: int = DEFAULT_POWER_ITERS
    trace_estimator: str = "auto"
    deflate: bool = True
    seed: Seed = 0
    max_exact_dim: int | None = None
    available_bytes: int | None = None
    alignment_probes: int = DEFAULT_ALIGNMENT_PROBES
    sample_axes: int = 1
    spectrum: bool = True

    def __post_init__(self) -> None:
        _check_choices(self.method, self.trace_estimator, self.top_k)
        if self.sample_axes not in (1, 2):
            raise InputError(f"expected sample_axes 1 or 2, got {self.sample_axes!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> EstimatorOptions:
        """From a mapping of its field names (``{"method": "stochastic", "probes": 24}``)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(f"expected estimator options among {known}, got {unknown}")
        return cls(**options)

    def settings(self) -> dict[str, Any]:
        """The settings that decide the numbers, for a row's stored settings: method,
        probes, steps, top_k and seed always, every other field when it is not its default."""
        always = ("method", "probes", "steps", "top_k", "seed")
        default = EstimatorOptions()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in always or getattr(self, f.name) != getattr(default, f.name)}


def _check_choices(method: str, trace_estimator: str, top_k: int) -> None:
    if method not in METHODS:
        raise InputError(f"expected method among {list(METHODS)}, got {method!r}")
    if trace_estimator not in TRACE_ESTIMATORS:
        raise InputError(f"expected trace_estimator among {list(TRACE_ESTIMATORS)}, "
                         f"got {trace_estimator!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputError(f"expected a non-negative integer top_k, got {top_k!r}")


@dataclass(frozen=True)
class Sketch:
    """The sketched traced kernel's settings (:func:`cvcore.sketch.sketched_kernel`).

    Attributes:
        projections: ``m``; with ``target_error`` too, the pilot's size.
        target_error: the kernel's relative standard error to reach.
        seed: the seed of the projections.
    """

    projections: int | None = None
    target_error: float | None = None
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        """The settings that decide the numbers, for a row's stored settings."""
        return {"projections": self.projections, "target_error": self.target_error}


class Compute(str, Enum):
    """What a request computes, decided once (:attr:`MeasureRequest.compute`).

    KERNEL: the kernel, then its collective variables.
    LAYERS: the kernel from the backend's per-layer kernels, and one row per layer.
    DIAGONAL: the kernel's diagonal only (the variables asked need nothing more).
    ESTIMATE: trace, entropy and top eigenvalues with error bars (:mod:`cvcore.estimate`).
    SKETCH: the sketched traced kernel (:mod:`cvcore.sketch`).
    CROSS: the kernel from per-sample Jacobians (:mod:`cvcore.cross`): between two input
        sets, or with chosen traced / diagonal output axes.
    """

    KERNEL = "kernel"
    LAYERS = "layers"
    DIAGONAL = "diagonal"
    ESTIMATE = "estimate"
    SKETCH = "sketch"
    CROSS = "cross"


@dataclass(frozen=True)
class MeasureRequest:
    """One measurement, validated: how to build the kernel, which backend, what to compute.

    Built by :func:`cvcore.validate.measure_request`; never built with unchecked values.

    Attributes:
        kernel: the kernel's options, as every backend reads them.
        backend: the backend named by the user; ``None`` chooses it from the model.
        variables: the variables asked for (``None``: all).
        per_layer: also split the kernel by layer.
        estimator: estimate with error bars instead of measuring exactly.
        sketch: the sketched traced kernel instead of the exact one.
        targets: the probe's targets; with them the kernel is formed (whatever the
            variables) and its alignment with the targets and with the residual
            ``f(x) − y`` is measured too (:mod:`cvcore.dynamics`).
    """

    kernel: KernelRequest = field(default_factory=KernelRequest)
    backend: str | None = None
    variables: tuple[str, ...] | None = None
    per_layer: bool = False
    estimator: EstimatorOptions | None = None
    sketch: Sketch | None = None
    targets: Targets | None = None
    #: the second input set of a cross kernel ``K(x, against)`` (checked by
    #: :func:`cvcore.validate.check_against`); ``None``: the self kernel
    against: Any = field(default=None, compare=False)
    #: which output axes are traced or kept diagonal (neural-tangents' layout);
    #: ``None``: cvcore's ``kernel`` convention
    axes: KernelAxes | None = None

    @property
    def compute(self) -> Compute:
        """What this request computes (the one place it is decided)."""
        if self.against is not None or self.axes is not None:
            return Compute.CROSS
        if self.estimator is not None:
            return Compute.ESTIMATE
        if self.sketch is not None:
            return Compute.SKETCH
        if self.per_layer:
            return Compute.LAYERS
        if (self.targets is None and self.variables is not None
                and set(self.variables) <= set(DIAGONAL_VARIABLES)):
            return Compute.DIAGONAL
        return Compute.KERNEL

    @property
    def covariance(self) -> bool:
        """Whether the covariance entropy (a second eigendecomposition) is wanted."""
        return self.variables is None or "covariance_entropy" in self.variables


__all__ = [
    "MEASURE_ONLY",
    "METHODS",
    "NTK_ONLY",
    "TRACE_ESTIMATORS",
    "Compute",
    "EstimatorOptions",
    "MeasureRequest",
    "Options",
    "Sketch",
    "Targets",
    "option_names",
]
