"""Measuring checkpoints: one probe set, many checkpoints, one row each."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvcore.api import Head, build, build_diagonal, diagonal_only, heads, layer_rows
from cvcore.checkpoints import load_checkpoint, natural_key
from cvcore.data_io import batch_size, load_data, needs_model, probe_subset
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
    per_layer: bool = False,
    sketch: dict[str, Any] | None = None,
) -> Iterator[Row]:
    """Yield one :class:`Row` per checkpoint and head (an actor-critic gives two rows,
    actor and critic), all measured on the same probe set.

    Probe inputs a data loader makes from a model (``env:CartPole-v1``: observations
    rolled out by the policy) come from the first checkpoint, so every checkpoint is
    measured on one probe set.

    ``sketch`` (``projections``, ``target_error``, ``seed``, ``progress``) measures the
    sketched traced kernel (:func:`cvcore.sketch.sketched_kernel`) instead of the exact one.
    """
    ordered = expand(paths)
    shared_inputs: Any = None
    if probe.data is not None and needs_model(probe.data):
        if ordered:
            first = load_checkpoint(ordered[0], options).model
            shared_inputs = load_data(probe.data, probe.key, model=first,
                                      samples=probe.samples, seed=probe.seed,
                                      family=request.family)
    elif probe.data is not None:
        shared_inputs = probe_subset(load_data(probe.data, probe.key), probe.samples, probe.seed)
    for path in ordered:
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
        for head in heads(loaded.model, inputs, request):
            yield _row(path, loaded.model, inputs, head, name, variables, estimator, started,
                       per_layer, sketch)
            started = time.perf_counter()


def _row(path: Path, model: Any, inputs: Any, head: Head, name: str | None,
         variables: tuple[str, ...] | None, estimator: dict[str, Any] | None,
         started: float, per_layer: bool = False,
         sketch: dict[str, Any] | None = None) -> Row:
    """One row: the collective variables of one head of one checkpoint."""
    request = head.request
    meta: dict[str, Any] = {"family": head.family, "output": head.output}
    if estimator is not None:
        from cvcore.estimate import estimate

        est = estimate(model, inputs, backend=name, **estimator, **_request_options(request))
        n = batch_size(inputs)
        return Row(source=str(path), backend=name or "auto", kernel=request.kernel,
                   n_samples=n, n_outputs=est.dim // n if request.kernel == "full" else None,
                   dtype=request.dtype, seconds=time.perf_counter() - started, variables=est,
                   **meta)
    if sketch is not None:
        from cvcore.sketch import sketched_kernel

        sk = sketched_kernel(model, inputs, backend=name, request=request, **sketch)
        return Row(source=str(path), backend=sk.backend, kernel="traced",
                   n_samples=sk.statistics.kernel.shape[0], n_outputs=sk.n_outputs,
                   dtype=request.dtype, seconds=time.perf_counter() - started,
                   variables=sk.variables(), family=head.family, output=sk.output)
    if diagonal_only(variables):
        diag, used = build_diagonal(model, inputs, backend=name, request=request)
        n = batch_size(inputs)
        return Row(source=str(path), backend=used, kernel=request.kernel, n_samples=n,
                   n_outputs=diag.size // n if request.kernel == "full" else None,
                   dtype=request.dtype, seconds=time.perf_counter() - started,
                   variables=diagonal_variables(diag), **meta)
    measured = build(model, inputs, backend=name, request=request, per_layer=per_layer)
    if measured.output is not None:  # the adapted model's own words (a language model's)
        meta["output"] = measured.output
    res = measured.result
    cv = collective_variables(res.kernel, covariance=variables is None
                              or "covariance_entropy" in variables)
    return Row(source=str(path), backend=measured.backend, kernel=request.kernel,
               n_samples=res.n_samples, n_outputs=res.n_outputs, dtype=request.dtype,
               seconds=time.perf_counter() - started, variables=cv,
               layers=layer_rows(measured.layers) if per_layer else None, **meta)


def _request_options(request: KernelRequest) -> dict[str, Any]:
    """A validated request back as keyword options (for :func:`cvcore.estimate.estimate`)."""
    return {"kernel": request.kernel, "output": request.output, "dtype": request.dtype,
            "device": request.device, "train": request.train,
            "memory_budget": request.memory_budget, "implementation": request.implementation,
            "family": request.family}
