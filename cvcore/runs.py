"""Measuring checkpoints: one probe set, many checkpoints, one row each."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvcore.api import build, build_diagonal, diagonal_only
from cvcore.checkpoints import load_checkpoint, natural_key
from cvcore.data_io import batch_size, load_data, probe_subset
from cvcore.errors import InputError
from cvcore.protocols import KernelRequest, LoadOptions
from cvcore.report import Row
from cvcore.spectrum import collective_variables, diagonal_variables


@dataclass(frozen=True)
class ProbeSpec:
    """Where the probe inputs come from and which subset to draw."""

    data: str | None = None
    key: str | None = None
    samples: int | None = None
    seed: int = 0


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint paths in natural order (``epoch_2`` before ``epoch_10``), duplicates dropped."""
    unique = {str(p): Path(p) for p in paths}
    return [unique[k] for k in sorted(unique, key=natural_key)]


def measure_checkpoints(
    paths: Sequence[str | Path],
    *,
    probe: ProbeSpec,
    request: KernelRequest,
    options: LoadOptions,
    backend: str | None = None,
    skip: set[str] | None = None,
    variables: tuple[str, ...] | None = None,
    estimator: dict[str, Any] | None = None,
    sketch: dict[str, Any] | None = None,
) -> Iterator[Row]:
    """Yield one :class:`Row` per checkpoint, all measured on the same probe set.

    ``sketch`` (``projections``, ``target_error``, ``seed``, ``progress``) measures the
    sketched traced kernel (:func:`cvcore.sketch.sketched_kernel`) instead of the exact one.
    """
    shared_inputs: Any = None
    if probe.data is not None:
        shared_inputs = probe_subset(load_data(probe.data, probe.key), probe.samples, probe.seed)
    for path in expand(paths):
        if skip and str(path) in skip:
            continue
        started = time.perf_counter()
        loaded = load_checkpoint(path, options)
        inputs = shared_inputs
        if inputs is None:
            if loaded.example_inputs is None:
                raise InputError(
                    f"{path}: expected --data (a file or a bundled dataset such as 'digits'), "
                    "got none, and the checkpoint carries no example inputs"
                )
            inputs = probe_subset(loaded.example_inputs, probe.samples, probe.seed)
        name = backend or loaded.backend
        if estimator is not None:
            from cvcore.estimate import estimate

            est = estimate(loaded.model, inputs, backend=name, **estimator,
                           **_request_options(request))
            n = batch_size(inputs)
            yield Row(source=str(path), backend=name or "auto", kernel=request.kernel,
                      n_samples=n, n_outputs=est.dim // n if request.kernel == "full" else None,
                      dtype=request.dtype, seconds=time.perf_counter() - started, variables=est)
            continue
        if sketch is not None:
            from cvcore.sketch import sketched_kernel

            sk = sketched_kernel(loaded.model, inputs, backend=name, request=request, **sketch)
            yield Row(source=str(path), backend=sk.backend, kernel="traced",
                      n_samples=sk.statistics.kernel.shape[0], n_outputs=sk.n_outputs,
                      dtype=request.dtype, seconds=time.perf_counter() - started,
                      variables=sk.variables(), output=sk.output)
            continue
        if diagonal_only(variables):
            diag, used = build_diagonal(loaded.model, inputs, backend=name, request=request)
            n = batch_size(inputs)
            yield Row(source=str(path), backend=used, kernel=request.kernel, n_samples=n,
                      n_outputs=diag.size // n if request.kernel == "full" else None,
                      dtype=request.dtype, seconds=time.perf_counter() - started,
                      variables=diagonal_variables(diag))
            continue
        measured = build(loaded.model, inputs, backend=name, request=request)
        res = measured.result
        cv = collective_variables(res.kernel)
        yield Row(source=str(path), backend=measured.backend, kernel=request.kernel,
                  n_samples=res.n_samples, n_outputs=res.n_outputs, dtype=request.dtype,
                  seconds=time.perf_counter() - started, variables=cv, output=measured.output)


def _request_options(request: KernelRequest) -> dict[str, Any]:
    """A validated request back as keyword options (for :func:`cvcore.estimate.estimate`)."""
    return {"kernel": request.kernel, "output": request.output, "dtype": request.dtype,
            "device": request.device, "train": request.train,
            "memory_budget": request.memory_budget, "implementation": request.implementation}
