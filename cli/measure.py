"""`cv measure`: collective variables of checkpoints, one row each, on one probe set."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.common import CsvOpt, JsonOpt, emit
from cvcore.cli.console import failure_text, progress_bar, progress_wanted, stderr

from cvcore.axes import KernelAxes
from cvcore.errors import InputError
from cvcore.model_factory import parse_model_args
from cvcore.protocols import Implementation, KernelRequest, LoadOptions
from cvcore.record.checkpoint_sink import CheckpointSink, step_of
from cvcore.request import EstimatorOptions, MeasureRequest, Options, Sketch
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
    force: Annotated[bool, typer.Option(help="Overwrite an existing --csv table or --save-kernel file.")] = False,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first checkpoint that fails (default: report it as a failed row and go on).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-checkpoint lines on stderr.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the series to a record store (.db), one run.")] = None,
    per_layer: Annotated[bool, typer.Option(help="Also one row per layer (trace, share, entropy, effective rank of its own kernel); --csv then has one line per layer.")] = False,
    against: Annotated[str | None, typer.Option(help="A second input set (.npy, .npz, a bundled dataset): the cross kernel K(--data, --against) per checkpoint, summarised (shape, mean, norm, singular values); no collective variables.")] = None,
    against_samples: Annotated[int | None, typer.Option(help="Draw this many inputs of --against at random (--seed chooses which).")] = None,
    save_kernel: Annotated[Path | None, typer.Option(help="Save the kernel(s) to a .npy (one checkpoint) or .npz (one array per checkpoint) and print their summary (alone: the --kernel convention's self kernel).")] = None,
    trace_axes: Annotated[str | None, typer.Option(help="Output axes to trace, neural-tangents' trace_axes, e.g. '-1' or '1,2' ('' for none); the kernel then has neural-tangents' layout.")] = None,
    diagonal_axes: Annotated[str | None, typer.Option(help="Output axes of which only the diagonal is kept, e.g. '-1'.")] = None,
    trace_reduction: Annotated[str, typer.Option(help="mean (neural-tangents, cvcore's traced) or sum over the traced axes.")] = "mean",
) -> None:
    """Collective variables of checkpoints, one row each, on one probe set."""
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _check_series_options(csv, resume, force, save_kernel)
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
    if against is not None or trace_axes is not None or diagonal_axes is not None \
            or save_kernel is not None:
        axes = _axes(trace_axes, diagonal_axes, trace_reduction)
        cross = measure_request(Options(backend=backend), kernel=kernel_request,
                                against=against, axes=axes, per_layer=per_layer,
                                variables=variables,
                                estimator=_estimator(method, probes, steps, top_k, seed),
                                sketch=sketch)
        with quiet_stderr(quiet):
            _measure_cross(checkpoints, ProbeSpec(data, key, samples, seed),
                           None if against is None else ProbeSpec(against, None,
                                                                  against_samples, seed),
                           cross, options, as_json, save_kernel, fail_fast, quiet, force)
        return
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
        with quiet_stderr(quiet), progress_bar(progress_wanted(quiet)):
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
    if verify:
        _say_verified(log, rows, kernel_request)
    _exit_on_failures(rows)


def _check_series_options(csv: Path | None, resume: bool, force: bool,
                          save_kernel: Path | None = None) -> None:
    if resume and csv is None:
        raise InputError("expected --csv with --resume, got --resume alone")
    if force and csv is None and save_kernel is None:
        raise InputError("expected --csv or --save-kernel with --force, got --force alone")
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


def _axes(trace_axes: str | None, diagonal_axes: str | None, reduction: str) -> KernelAxes | None:
    """``--trace-axes`` / ``--diagonal-axes`` as :class:`KernelAxes` (``None``: cvcore's
    ``--kernel`` convention)."""
    if trace_axes is None and diagonal_axes is None and reduction == "mean":
        return None

    def ints(text: str | None, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        if text is None:
            return default
        try:
            return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
        except ValueError:
            raise InputError(f"expected {name} as a comma list of ints such as '-1' or '1,2', "
                             f"got {text!r}") from None

    return KernelAxes.make(ints(trace_axes, "--trace-axes", (-1,)),
                           ints(diagonal_axes, "--diagonal-axes", ()), reduction)


def _measure_cross(checkpoints: list[Path], probe: ProbeSpec, against: ProbeSpec | None,
                   request: MeasureRequest, options: LoadOptions, as_json: bool,
                   save_kernel: Path | None, fail_fast: bool, quiet: bool,
                   force: bool = False) -> None:
    """``--against`` / ``--trace-axes``: one summary row per checkpoint, the kernels saved."""
    import json

    from cvcore.cross_checkpoints import measure_cross, save_kernels
    from cvcore.files import check_output_path

    if save_kernel is not None:  # never an existing file without --force, never an input
        inputs = [*checkpoints, *(Path(s.data) for s in (probe, against)
                                  if s is not None and s.data is not None)]
        check_output_path(save_kernel, what="--save-kernel", force=force,
                          sources=[p for p in inputs if p.exists()])
    log = stderr()
    rows = []
    for row in measure_cross(checkpoints, probe=probe, against=against, request=request,
                             options=options, fail_fast=fail_fast):
        if row.error is not None:
            log.print(f"error: {row.source}: {row.error}", markup=False, soft_wrap=True)
        elif not quiet:
            log.print(f"measured {row.source} ({row.seconds:.2f} s)", markup=False, soft_wrap=True)
        rows.append(row)
    if save_kernel is not None and any(r.error is None for r in rows):
        save_kernels(save_kernel, rows)
        if not quiet:
            log.print(f"saved the kernel{'s' if len(rows) > 1 else ''} to {save_kernel}",
                      markup=False, soft_wrap=True)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        _print_cross(rows)
    failed = [r.source for r in rows if r.error is not None]
    if failed:
        raise typer.Exit(2 if len(failed) == len(rows) else 1)


def _print_cross(rows: list[Any]) -> None:
    """The summary rows as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    ok = [r for r in rows if r.error is None]
    title = ok[0].summary["convention"] if ok else "kernel"
    table = Table(title=f"kernel summary ({title})")
    for name in ("source", "shape", "mean", "frobenius", "top singular value",
                 "mean singular value", "seconds"):
        table.add_column(name)
    for r in ok:
        s = r.summary
        table.add_row(r.source, " x ".join(map(str, s["shape"])), f"{s['mean']:.6g}",
                      f"{s['frobenius']:.6g}", f"{s['top_singular_value']:.6g}",
                      f"{s['mean_singular_value']:.6g}", f"{r.seconds:.2f}")
    Console().print(table)


def _say_verified(log: Any, rows: list[Row], request: KernelRequest) -> None:
    """``--verify`` says what it checked, and that it passed (a failure is the row's error)."""
    from cvcore.verify import SAMPLES, TOLERANCE

    ok = [r for r in rows if r.error is None]
    if not ok:
        return
    if request.implementation == Implementation.JACOBIAN:
        log.print("verify: nothing to compare, the kernel was built by the Jacobian path itself",
                  markup=False, soft_wrap=True)
        return
    log.print(f"verify: passed: {len(ok)} kernel{'s' if len(ok) > 1 else ''} matched the "
              f"Jacobian path on {min(SAMPLES, max(r.n_samples for r in ok))} samples each "
              f"(relative difference below {TOLERANCE[request.dtype]:g}, {request.dtype})",
              markup=False, soft_wrap=True)


# -- -q: TensorFlow's start-up lines kept off stderr ------------------------------------
# TensorFlow's C++ runtime writes lines such as ``oneDNN custom operations are on`` straight
# to file descriptor 2 when it is imported, before any Python logger or
# TF_CPP_MIN_LOG_LEVEL can stop them (the oneDNN line is printed at every level).

#: The lines TensorFlow / XLA / absl print at start-up (informational ``I`` and warning
#: ``W`` lines of the glog format, the absl preamble, the CPU-instruction advice).
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]"
    r"|To enable the following instructions:"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] tensorflow/)")


def is_noise(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's start-up lines.

    >>> is_noise("I0000 00:00:1796574131.524634   31752 port.cc:153] oneDNN custom operations are on.")
    True
    >>> is_noise("error: run.pt: expected --data, got none")
    False
    """
    return bool(NOISE.match(line))


@contextlib.contextmanager
def quiet_stderr(enabled: bool) -> Iterator[None]:
    """While the block runs, file descriptor 2 goes through a filter that drops
    TensorFlow's start-up lines (:func:`is_noise`); a no-op when not ``enabled``."""
    if not enabled:
        yield
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as source:
            for raw in source:
                if not is_noise(raw.decode("utf-8", "replace")):
                    os.write(saved, raw)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)  # closes the pipe's last write end: the pump sees its end
        thread.join(timeout=5)
        os.close(saved)
