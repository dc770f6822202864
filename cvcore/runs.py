"""Measuring checkpoints: one probe set, many checkpoints, one row each."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cvcore import progress
from cvcore.api import Head, build, build_diagonal, diagonal_only, heads, layer_rows
from cvcore.checkpoints import load_checkpoint, natural_key
from cvcore.data_io import batch_size, load_data, needs_model, probe_subset
from cvcore.errors import CVCoreError, InputError
from cvcore.estimate import EstimatorOptions, estimate_request
from cvcore.protocols import KernelRequest, LoadOptions
from cvcore.report import Row, settings_text
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


#: The estimator's settings: an :class:`EstimatorOptions`, or a mapping of its fields.
Estimator = EstimatorOptions | Mapping[str, Any]


def run_settings(probe: ProbeSpec, request: KernelRequest, options: LoadOptions, *,
                 backend: str | None = None, variables: tuple[str, ...] | None = None,
                 estimator: Estimator | None = None,
                 sketch: dict[str, Any] | None = None) -> str:
    """The settings that decide a row's numbers, as canonical JSON (stored with each row,
    compared by ``--resume``). Device, memory budget and implementation only change
    round-off and are left out."""
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
        "sketch": None if sketch is None else {k: sketch.get(k) for k in ("projections",
                                                                          "target_error")},
    })


def seed_frameworks(seed: int) -> None:
    """Seed the random generators of the frameworks already imported (dropout under
    ``train=True``), never importing one to do so."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        torch.manual_seed(seed)
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "random"):
        tf.random.set_seed(seed)
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "utils") and hasattr(keras.utils, "set_random_seed"):
        keras.utils.set_random_seed(seed)


def measure_checkpoints(
    paths: Sequence[str | Path],
    *,
    probe: ProbeSpec,
    request: KernelRequest,
    options: LoadOptions,
    backend: str | None = None,
    skip: set[str] | None = None,
    variables: tuple[str, ...] | None = None,
    estimator: Estimator | None = None,
    per_layer: bool = False,
    sketch: dict[str, Any] | None = None,
    fail_fast: bool = True,
) -> Iterator[Row]:
    """Yield one :class:`Row` per checkpoint and head (an actor-critic gives two rows,
    actor and critic), all measured on the same probe set.

    Probe inputs a data loader makes from a model (``env:CartPole-v1``: observations
    rolled out by the policy) come from the first checkpoint, so every checkpoint is
    measured on one probe set.

    ``sketch`` (``projections``, ``target_error``, ``seed``, ``progress``) measures the
    sketched traced kernel (:func:`cvcore.sketch.sketched_kernel`) instead of the exact one.

    With ``fail_fast=False`` a checkpoint that cannot be read or measured (a
    :class:`~cvcore.errors.CVCoreError`) becomes a row with its ``error`` and the series
    goes on. Under ``request.train`` the frameworks' generators are seeded with
    ``probe.seed`` before each checkpoint, so dropout draws the same masks in every run.
    Progress (stage ``"checkpoints"``) goes to :mod:`cvcore.progress`.
    """
    settings = run_settings(probe, request, options, backend=backend, variables=variables,
                            estimator=estimator, sketch=sketch)
    if estimator is not None and not isinstance(estimator, EstimatorOptions):
        estimator = EstimatorOptions.from_mapping(estimator)
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
    todo = [p for p in ordered if not (skip and str(p) in skip)]
    for index, path in enumerate(todo):
        started = time.perf_counter()
        try:
            rows = _measure_one(path, shared_inputs, probe=probe, request=request,
                                options=options, backend=backend, variables=variables,
                                estimator=estimator, started=started, per_layer=per_layer,
                                sketch=sketch)
        except CVCoreError as exc:
            if fail_fast:
                raise
            n = batch_size(shared_inputs) if shared_inputs is not None else 0
            rows = [Row(source=str(path), backend=backend or "", kernel=request.kernel,
                        n_samples=n, n_outputs=None, dtype=request.dtype,
                        seconds=time.perf_counter() - started, variables=None,
                        error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)]
        progress.advance("checkpoints", index + 1, len(todo))
        for row in rows:
            yield replace(row, settings=settings)


def _measure_one(path: Path, shared_inputs: Any, *, probe: ProbeSpec, request: KernelRequest,
                 options: LoadOptions, backend: str | None, variables: tuple[str, ...] | None,
                 estimator: EstimatorOptions | None, started: float, per_layer: bool,
                 sketch: dict[str, Any] | None) -> list[Row]:
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
    name = backend or loaded.backend
    rows = []
    try:
        for head in heads(loaded.model, inputs, request):
            if request.train:
                seed_frameworks(probe.seed)
            rows.append(_row(path, loaded.model, inputs, head, name, variables, estimator,
                             started, per_layer, sketch))
            started = time.perf_counter()
    except InputError as exc:
        if probe.data is not None and str(exc).startswith("expected numeric probe inputs"):
            raise InputError(f"{probe.data}: {exc}") from None  # name the file of texts
        raise
    return rows


def _row(path: Path, model: Any, inputs: Any, head: Head, name: str | None,
         variables: tuple[str, ...] | None, estimator: EstimatorOptions | None,
         started: float, per_layer: bool = False,
         sketch: dict[str, Any] | None = None) -> Row:
    """One row: the collective variables of one head of one checkpoint."""
    request = head.request
    meta: dict[str, Any] = {"family": head.family, "output": head.output}
    if estimator is not None:
        est = estimate_request(model, inputs, request, estimator, backend=name)
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

