"""Measuring checkpoints: one probe set, many checkpoints, one row each."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cvcore import progress
from cvcore.api import Outcome, execute, layer_rows, resolve_heads
from cvcore.capabilities import count_parameters, seed_frameworks
from cvcore.checkpoints import load_checkpoint, natural_key
from cvcore.data_io import batch_size, data_loader_for, load_data, needs_model, probe_subset
from cvcore.errors import CVCoreError, InputError
from cvcore.protocols import KernelRequest, LoadOptions
from cvcore.request import EstimatorOptions, MeasureRequest, Options, Sketch
from cvcore.rows import Row, settings_text
from cvcore.spectrum import collective_variables, diagonal_variables
from cvcore.validate import measure_request


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


#: The estimator's settings: an :class:`EstimatorOptions`, or a mapping of its fields.
Estimator = EstimatorOptions | Mapping[str, Any]


def run_settings(probe: ProbeSpec, request: KernelRequest | MeasureRequest,
                 options: LoadOptions, *, backend: str | None = None,
                 variables: tuple[str, ...] | None = None,
                 estimator: Estimator | None = None,
                 sketch: Sketch | None = None) -> str:
    """The settings that decide a row's numbers, as canonical JSON (stored with each row,
    compared by ``--resume``). Device, memory budget and implementation only change
    round-off and are left out. A :class:`~cvcore.request.MeasureRequest` carries the
    backend, the variables, the estimator and the sketch itself."""
    if isinstance(request, MeasureRequest):
        backend, variables = request.backend, request.variables
        estimator, sketch = request.estimator, request.sketch
        request = request.kernel
    if isinstance(estimator, EstimatorOptions):
        estimator = estimator.settings()
    return settings_text({
        "data": probe.data, "key": probe.key, "samples": probe.samples, "seed": probe.seed,
        "kernel": request.kernel, "output": request.output, "dtype": request.dtype,
        "train": request.train, "model": options.model_factory,
        "model_args": options.model_args, "backend": backend,
        "variables": list(variables) if variables else None,
        "estimator": None if estimator is None else dict(estimator),
        "family": request.family, "max_length": options.max_length,
        "sketch": None if sketch is None else sketch.settings(),
    })


def measure_checkpoints(
    paths: Sequence[str | Path],
    *,
    probe: ProbeSpec,
    request: KernelRequest | MeasureRequest,
    options: LoadOptions,
    backend: str | None = None,
    skip: set[str] | None = None,
    variables: tuple[str, ...] | None = None,
    estimator: Estimator | None = None,
    per_layer: bool = False,
    sketch: Sketch | None = None,
    fail_fast: bool = True,
    settings: str | None = None,
    say: Callable[[str], None] | None = None,
) -> Iterator[Row]:
    """Yield one :class:`Row` per checkpoint and head (an actor-critic gives two rows,
    actor and critic), all measured on the same probe set.

    ``request`` is a :class:`~cvcore.request.MeasureRequest` (what ``cv measure`` builds
    once), or a kernel request with what to compute as keywords (``backend``,
    ``variables``, ``estimator``, ``per_layer``, ``sketch``), made into one here.

    Probe inputs a data loader makes from a model (``env:CartPole-v1``: observations
    rolled out by the policy) come from the first checkpoint, so every checkpoint is
    measured on one probe set.

    ``sketch`` measures the sketched traced kernel (:func:`cvcore.sketch.sketched_kernel`)
    instead of the exact one; ``say`` receives its progress lines.

    With ``fail_fast=False`` a checkpoint that cannot be read or measured (a
    :class:`~cvcore.errors.CVCoreError`) becomes a row with its ``error`` and the series
    goes on. Under ``request.train`` the frameworks' generators are seeded with
    ``probe.seed`` before each checkpoint, so dropout draws the same masks in every run.
    Progress (stage ``"checkpoints"``) goes to :mod:`cvcore.progress`. ``settings`` is
    :func:`run_settings`' text when the caller has it already.
    """
    if settings is None:
        settings = run_settings(probe, request, options, backend=backend, variables=variables,
                                estimator=estimator, sketch=sketch)
    if isinstance(request, KernelRequest):
        if estimator is not None and not isinstance(estimator, EstimatorOptions):
            estimator = EstimatorOptions.from_mapping(estimator)
        request = measure_request(Options(backend=backend), variables=variables,
                                  per_layer=per_layer, estimator=estimator, sketch=sketch,
                                  kernel=request)
    kernel = request.kernel
    ordered = expand(paths)
    shared_inputs: Any = None
    loader = data_loader_for(probe.data) if probe.data is not None else None
    if probe.data is not None and needs_model(loader):
        if ordered:
            first = load_checkpoint(ordered[0], options).model
            shared_inputs = load_data(probe.data, probe.key, model=first,
                                      samples=probe.samples, seed=probe.seed,
                                      family=kernel.family, loader=loader)
    elif probe.data is not None:
        shared_inputs = probe_subset(load_data(probe.data, probe.key, loader=loader),
                                     probe.samples, probe.seed)
    todo = [p for p in ordered if not (skip and str(p) in skip)]
    for index, path in enumerate(todo):
        started = time.perf_counter()
        try:
            rows = _measure_one(path, shared_inputs, probe=probe, request=request,
                                options=options, started=started, say=say)
        except CVCoreError as exc:
            if fail_fast:
                raise
            n = batch_size(shared_inputs) if shared_inputs is not None else 0
            rows = [Row(source=str(path), backend=request.backend or "", kernel=kernel.kernel,
                        n_samples=n, n_outputs=None, dtype=kernel.dtype,
                        seconds=time.perf_counter() - started, variables=None,
                        error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)]
        progress.advance("checkpoints", index + 1, len(todo))
        for row in rows:
            yield replace(row, settings=settings)


def _measure_one(path: Path, shared_inputs: Any, *, probe: ProbeSpec, request: MeasureRequest,
                 options: LoadOptions, started: float,
                 say: Callable[[str], None] | None) -> list[Row]:
    """One checkpoint's rows, one per head (errors propagate)."""
    loaded = load_checkpoint(path, options)
    inputs = shared_inputs
    if inputs is None:
        if loaded.example_inputs is None:
            raise InputError(
                f"{path}: expected --data (a file or a bundled dataset such as 'digits'), "
                "got none, and the checkpoint carries no example inputs"
            )
        inputs = probe_subset(loaded.example_inputs, probe.samples, probe.seed)
    if request.backend is None and loaded.backend is not None:
        request = replace(request, backend=loaded.backend)
    rows = []
    try:
        for resolved in resolve_heads(loaded.model, inputs, request):
            if request.kernel.train:
                seed_frameworks(probe.seed)
            done = execute(resolved, request, say)
            row = _row(path, inputs, done, request, started)
            n_params = done.result.n_params if done.result is not None else None
            if n_params is None:
                n_params = count_parameters(resolved.model, resolved.backend)
            rows.append(replace(row, model_class=_model_class(loaded.model),
                                n_params=n_params))
            started = time.perf_counter()
    except InputError as exc:
        if probe.data is not None and str(exc).startswith("expected numeric probe inputs"):
            raise InputError(f"{probe.data}: {exc}") from None  # name the file of texts
        raise
    return rows


def _model_class(model: Any) -> str:
    from cvcore.record.recorder import model_description  # the Recorder's own words

    return model_description(model)


def _row(path: Path, inputs: Any, done: Outcome, request: MeasureRequest, started: float
         ) -> Row:
    """One row: the collective variables of one head of one checkpoint."""
    r = done.resolved
    req = r.request
    meta: dict[str, Any] = {"family": r.family, "output": r.head}
    per = req.kernel == "full"
    if done.estimated is not None:
        est = done.estimated
        n = batch_size(inputs)
        return Row(source=str(path), backend=request.backend or "auto", kernel=req.kernel,
                   n_samples=n, n_outputs=est.dim // n if per else None,
                   dtype=req.dtype, seconds=time.perf_counter() - started, variables=est,
                   **meta)
    if done.sketched is not None:
        sk = done.sketched
        return Row(source=str(path), backend=sk.backend, kernel="traced",
                   n_samples=sk.statistics.kernel.shape[0], n_outputs=sk.n_outputs,
                   dtype=req.dtype, seconds=time.perf_counter() - started,
                   variables=sk.variables(), family=r.family, output=sk.output)
    if done.diagonal is not None:
        diag = done.diagonal
        n = batch_size(inputs)
        return Row(source=str(path), backend=done.backend, kernel=req.kernel, n_samples=n,
                   n_outputs=diag.size // n if per else None,
                   dtype=req.dtype, seconds=time.perf_counter() - started,
                   variables=diagonal_variables(diag), **meta)
    assert done.result is not None
    if r.output is not None:  # the adapted model's own words (a language model's)
        meta["output"] = r.output
    res = done.result
    cv = collective_variables(res.kernel, covariance=request.covariance)
    return Row(source=str(path), backend=done.backend, kernel=req.kernel,
               n_samples=res.n_samples, n_outputs=res.n_outputs, dtype=req.dtype,
               seconds=time.perf_counter() - started, variables=cv,
               layers=layer_rows(done.layers) if request.per_layer else None, **meta)
