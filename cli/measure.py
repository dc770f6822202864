"""`cv measure`: collective variables of checkpoints, one row each, on one probe set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.common import CsvOpt, JsonOpt, emit
from cvcore.cli.console import failure_text, progress_bar, progress_wanted, stderr

from cvcore.errors import InputError
from cvcore.model_factory import parse_model_args
from cvcore.protocols import Implementation, LoadOptions
from cvcore.record.checkpoint_sink import CheckpointSink, step_of
from cvcore.request import EstimatorOptions, Options, Sketch
from cvcore.rows import CsvSink, Row
from cvcore.runs import ProbeSpec, expand, measure_checkpoints, run_settings
from cvcore.validate import make_request, measure_request


def measure(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints, measured in natural order.")],
    data: Annotated[str | None, typer.Option(help="Probe inputs: .npy, .npz, .pt, a bundled dataset (digits, iris), or env:ID (observations rolled out by an RL policy in that Gymnasium environment).")] = None,
    key: Annotated[str | None, typer.Option(help="Array name inside an .npz data file.")] = None,
    samples: Annotated[int | None, typer.Option(help="Draw this many probe inputs at random.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the probe subset, the stochastic estimator and, with --train, dropout (same seed, same numbers).")] = 0,
    model: Annotated[str | None, typer.Option("--model", help="package.module:factory (or file.py:factory) that builds the architecture for a state_dict; called without arguments unless --model-args.")] = None,
    model_args: Annotated[str | None, typer.Option("--model-args", help='Keyword arguments for the --model factory as a JSON object, e.g. \'{"width": 32}\'.')] = None,
    trust: Annotated[bool, typer.Option(help="Allow arbitrary code in a pickle you made yourself.")] = False,
    family: Annotated[str | None, typer.Option(help="Model family: language, graph, autoencoder, rl, or none (default: from the model's type).")] = None,
    kernel: Annotated[str, typer.Option(help="traced (N×N) or full (N·O×N·O).")] = "traced",
    output: Annotated[str | None, typer.Option(help="Which output to use: an index or a key; language models: last, positions, next-token, sequence, pooled, cls, logits (docs/adapters.md).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest token sequence kept when texts are tokenized.")] = None,
    projections: Annotated[int | None, typer.Option(help="Sketched traced kernel from this many random projections of the outputs (unbiased, with standard errors).")] = None,
    target_error: Annotated[float | None, typer.Option(help="Sketched traced kernel: as many projections as reach this relative standard error.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: GPU if visible).")] = None,
    backend: Annotated[str | None, typer.Option(help="Backend name (default: from the model).")] = None,
    implementation: Annotated[Implementation, typer.Option(help="How the kernel is built.")] = Implementation.AUTO,
    memory_budget: Annotated[str | None, typer.Option(help="Bytes one block may use, e.g. 512MB.")] = None,
    train: Annotated[bool, typer.Option(help="Measure in training mode.")] = False,
    verify: Annotated[bool, typer.Option(help="Compare the kernel with the Jacobian path on a few samples; fail on a disagreement.")] = False,
    variables: Annotated[str | None, typer.Option(help="Comma list of variables; 'trace' alone never forms the kernel.")] = None,
    method: Annotated[str | None, typer.Option(help="auto, exact or stochastic: trace and entropy with error bars (matrix-free when stochastic).")] = None,
    probes: Annotated[int, typer.Option(help="Probe vectors of a stochastic estimate.")] = 32,
    steps: Annotated[int, typer.Option(help="Lanczos steps per probe.")] = 30,
    top_k: Annotated[int, typer.Option(help="Largest eigenvalues to report with --method.")] = 10,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue --csv: skip checkpoints already in it (refused if they were measured with other settings).")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --csv table.")] = False,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first checkpoint that fails (default: report it as a failed row and go on).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-checkpoint lines on stderr.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the series to a record store (.db), one run.")] = None,
    per_layer: Annotated[bool, typer.Option(help="Also one row per layer (trace, share, entropy, effective rank of its own kernel); --csv then has one line per layer.")] = False,
) -> None:
    """Collective variables of checkpoints, one row each, on one probe set."""
    _check_series_options(csv, resume, force)
    selector: Any = int(output) if output is not None and output.lstrip("-").isdigit() else output
    kernel_request = make_request(kernel=kernel, output=selector, dtype=dtype, device=device,
                                  train=train, memory_budget=memory_budget,
                                  implementation=implementation, family=family, verify=verify)
    if per_layer and (resume or method is not None or variables is not None):
        raise InputError("expected --per-layer without --resume, --method and --variables, got "
                         + ", ".join(f for f, on in (("--resume", resume), ("--method", method),
                                                     ("--variables", variables)) if on))
    sketch = None
    if projections is not None or target_error is not None:
        if kernel != "traced" or method is not None:
            raise InputError("expected --projections / --target-error with the traced kernel and "
                             f"no --method, got --kernel {kernel} and --method {method}")
        sketch = Sketch(projections=projections, target_error=target_error, seed=seed)
    probe = ProbeSpec(data, key, samples, seed)
    options = LoadOptions(model_factory=model, trust=trust, key=None, max_length=max_length,
                          model_args=parse_model_args(model_args))
    if model_args is not None and model is None:
        raise InputError("expected --model with --model-args, got --model-args alone")
    request = measure_request(Options(backend=backend), variables=variables,
                              per_layer=per_layer, sketch=sketch, kernel=kernel_request)
    request = replace(request, estimator=_estimator(method, probes, steps, top_k, seed))
    settings = run_settings(probe, request, options)
    sink = (CsvSink(csv, resume=resume, force=force, settings=settings)
            if csv is not None and not per_layer else None)
    if out is not None:  # every step must fit the store before anything is measured
        for position, path in enumerate(expand(checkpoints)):
            step_of(str(path), position)
    store = None if out is None else CheckpointSink(
        out, probe={"data": data, "key": key, "samples": samples, "seed": seed})
    log = stderr()
    rows: list[Row] = []
    try:
        with progress_bar(progress_wanted(quiet)):
            for row in measure_checkpoints(
                checkpoints, probe=probe, request=request, options=options,
                skip=sink.done if sink else None, fail_fast=fail_fast, settings=settings,
                say=lambda line: log.print(line, markup=False),
            ):
                _log_row(log, row, quiet)
                rows.append(row)
                if sink is not None:
                    sink.add(row)
                if store is not None and row.error is None:
                    store.add(row)
    finally:
        if store is not None:
            store.close()
    if rows and all(r.error is not None for r in rows):
        raise typer.Exit(2)  # every checkpoint failed: the errors are already on stderr
    if per_layer and csv is not None:
        from cvcore.cli.per_layer import write_layer_csv

        write_layer_csv(csv, [r for r in rows if r.error is None])
    emit(rows, as_json, f"collective variables ({kernel} kernel)", notes=_probe_notes(probe, rows))
    if per_layer and not as_json:
        from cvcore.cli.per_layer import print_layers

        print_layers([r for r in rows if r.error is None])
    _exit_on_failures(rows)


def _check_series_options(csv: Path | None, resume: bool, force: bool) -> None:
    if resume and csv is None:
        raise InputError("expected --csv with --resume, got --resume alone")
    if force and csv is None:
        raise InputError("expected --csv with --force, got --force alone")
    if resume and force:
        raise InputError("expected one of --resume (continue the table) and --force "
                         "(overwrite it), got both")


def _estimator(method: str | None, probes: int, steps: int, top_k: int, seed: int
               ) -> EstimatorOptions | None:
    if method is None:
        return None
    return EstimatorOptions(method=method, probes=probes, steps=steps, top_k=top_k, seed=seed)


def _log_row(log: Any, row: Row, quiet: bool) -> None:
    if row.error is not None:  # errors are shown even with --quiet
        log.print(f"error: {failure_text(row)}", markup=False, soft_wrap=True)
    elif not quiet:
        log.print(f"measured {row.source} ({row.seconds:.2f} s)", markup=False, soft_wrap=True)


def _probe_notes(probe: ProbeSpec, rows: list[Row]) -> list[str]:
    """Say how many samples were used when the user did not choose, and how to change it."""
    if probe.samples is not None or not rows:
        return []
    n = max(r.n_samples for r in rows)
    source = probe.data or "the example inputs"
    note = (f"probe set: all {n} samples of {source}; --samples N draws a fixed random "
            "subset of N (--seed chooses which)")
    return [note]


def _exit_on_failures(rows: list[Row]) -> None:
    failed = [r.source for r in rows if r.error is not None]
    if failed:
        stderr().print(f"{len(failed)} of {len(rows)} checkpoints failed: {', '.join(failed)}",
                       markup=False, soft_wrap=True)
        raise typer.Exit(1)
