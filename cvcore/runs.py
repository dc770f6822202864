"""Measuring checkpoints: one probe set, many checkpoints, one row each."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cvcore import progress
from cvcore.api import build, build_diagonal, diagonal_only
from cvcore.checkpoints import load_checkpoint, natural_key
from cvcore.data_io import batch_size, load_data, probe_subset
from cvcore.errors import CVCoreError, InputError
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


def run_settings(probe: ProbeSpec, request: KernelRequest, options: LoadOptions, *,
                 backend: str | None = None, variables: tuple[str, ...] | None = None,
                 estimator: dict[str, Any] | None = None) -> str:
    """The settings that decide a row's numbers, as canonical JSON (stored with each row,
    compared by ``--resume``). Device, memory budget and implementation only change
    round-off and are left out."""
    return settings_text({
        "data": probe.data, "key": probe.key, "samples": probe.samples, "seed": probe.seed,
        "kernel": request.kernel, "output": request.output, "dtype": request.dtype,
        "train": request.train, "model": options.model_factory,
        "model_args": options.model_args, "backend": backend,
        "variables": list(variables) if variables else None, "estimator": estimator,
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
    estimator: dict[str, Any] | None = None,
    fail_fast: bool = True,
) -> Iterator[Row]:
    """Yield one :class:`Row` per checkpoint, all measured on the same probe set.

    With ``fail_fast=False`` a checkpoint that cannot be read or measured (a
    :class:`~cvcore.errors.CVCoreError`) becomes a row with its ``error`` and the series
    goes on. Under ``request.train`` the frameworks' generators are seeded with
    ``probe.seed`` before each checkpoint, so dropout draws the same masks in every run.
    Progress (stage ``"checkpoints"``) goes to :mod:`cvcore.progress`.
    """
    settings = run_settings(probe, request, options, backend=backend, variables=variables,
                            estimator=estimator)
    shared_inputs: Any = None
    if probe.data is not None:
        shared_inputs = probe_subset(load_data(probe.data, probe.key), probe.samples, probe.seed)
    todo = [p for p in expand(paths) if not (skip and str(p) in skip)]
    for index, path in enumerate(todo):
        started = time.perf_counter()
        try:
            row = _measure_one(path, shared_inputs, probe=probe, request=request,
                               options=options, backend=backend, variables=variables,
                               estimator=estimator, started=started)
        except CVCoreError as exc:
            if fail_fast:
                raise
            n = batch_size(shared_inputs) if shared_inputs is not None else 0
            row = Row(source=str(path), backend=backend or "", kernel=request.kernel,
                      n_samples=n, n_outputs=None, dtype=request.dtype,
                      seconds=time.perf_counter() - started, variables=None,
                      error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        progress.advance("checkpoints", index + 1, len(todo))
        yield replace(row, settings=settings)


def _measure_one(path: Path, shared_inputs: Any, *, probe: ProbeSpec, request: KernelRequest,
                 options: LoadOptions, backend: str | None, variables: tuple[str, ...] | None,
                 estimator: dict[str, Any] | None, started: float) -> Row:
    """One checkpoint's row (errors propagate)."""
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
    if request.train:
        seed_frameworks(probe.seed)
    if estimator is not None:
        from cvcore.estimate import estimate

        est = estimate(loaded.model, inputs, backend=name, **estimator,
                       **_request_options(request))
        n = batch_size(inputs)
        return Row(source=str(path), backend=name or "auto", kernel=request.kernel,
                   n_samples=n, n_outputs=est.dim // n if request.kernel == "full" else None,
                   dtype=request.dtype, seconds=time.perf_counter() - started, variables=est)
    if diagonal_only(variables):
        diag, used = build_diagonal(loaded.model, inputs, backend=name, request=request)
        n = batch_size(inputs)
        return Row(source=str(path), backend=used, kernel=request.kernel, n_samples=n,
                   n_outputs=diag.size // n if request.kernel == "full" else None,
                   dtype=request.dtype, seconds=time.perf_counter() - started,
                   variables=diagonal_variables(diag))
    measured = build(loaded.model, inputs, backend=name, request=request)
    res = measured.result
    cv = collective_variables(res.kernel)
    return Row(source=str(path), backend=measured.backend, kernel=request.kernel,
               n_samples=res.n_samples, n_outputs=res.n_outputs, dtype=request.dtype,
               seconds=time.perf_counter() - started, variables=cv)


def _request_options(request: KernelRequest) -> dict[str, Any]:
    """A validated request back as keyword options (for :func:`cvcore.estimate.estimate`)."""
    return {"kernel": request.kernel, "output": request.output, "dtype": request.dtype,
            "device": request.device, "train": request.train,
            "memory_budget": request.memory_budget, "implementation": request.implementation}
