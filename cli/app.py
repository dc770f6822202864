"""The Typer application, built by :func:`make_app` (no side effects at import)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from cvcore.cli.output import print_json, print_table, stderr

from cvcore import plugins
from cvcore.api import make_request, parse_variables
from cvcore.data_io import read_kernel
from cvcore.errors import CVCoreError, InputError
from cvcore.protocols import Implementation, LoadOptions
from cvcore.report import CsvSink, Row, csv_text, spectrum_row, write_atomic
from cvcore.runs import ProbeSpec, measure_checkpoints

F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


def friendly(func: F) -> F:
    """Turn a cvcore error (a user's mistake) into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CVCoreError as exc:
            if _state["debug"]:
                raise
            stderr().print(f"error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            stderr().print("interrupted: rows already written are kept", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON list to stdout.")]
CsvOpt = Annotated[Path | None, typer.Option("--csv", help="Write a CSV table here.")]


def emit(rows: list[Row], as_json: bool, title: str) -> None:
    if as_json:
        print_json(rows)
    else:
        print_table(rows, title=title)


def spectrum(
    kernels: Annotated[list[Path], typer.Argument(help="Kernel files (.npy, or .npz with --key).")],
    key: Annotated[str | None, typer.Option(help="Array name inside an .npz file.")] = None,
    kernel: Annotated[str, typer.Option(help="The kernel's convention, for the report: traced or full.")] = "traced",
    outputs: Annotated[int | None, typer.Option(help="O, outputs per sample, for a full kernel.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Relative round-off tolerance for negative eigenvalues.")] = None,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Collective variables of kernels computed elsewhere."""
    if kernel not in ("traced", "full"):
        raise InputError(f"expected --kernel traced or full, got {kernel!r}")
    rows = []
    for path in kernels:
        started = time.perf_counter()
        matrix = read_kernel(path, key)
        rows.append(spectrum_row(str(path), matrix, convention=kernel, n_outputs=outputs,
                                 tolerance=tolerance, started=started))
    if csv is not None:
        write_atomic(csv, csv_text(rows))
    emit(rows, as_json, "collective variables")


def measure(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints, measured in natural order.")],
    data: Annotated[str | None, typer.Option(help="Probe inputs: .npy, .npz, .pt, or a bundled dataset (digits, iris).")] = None,
    key: Annotated[str | None, typer.Option(help="Array name inside an .npz data file.")] = None,
    samples: Annotated[int | None, typer.Option(help="Draw this many probe inputs at random.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the probe subset (same seed, same subset).")] = 0,
    model: Annotated[str | None, typer.Option("--model", help="package.module:factory that builds the architecture for a state_dict.")] = None,
    trust: Annotated[bool, typer.Option(help="Allow arbitrary code in a pickle you made yourself.")] = False,
    kernel: Annotated[str, typer.Option(help="traced (N×N) or full (N·O×N·O).")] = "traced",
    output: Annotated[str | None, typer.Option(help="Which output to use: an index or a key.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: GPU if visible).")] = None,
    backend: Annotated[str | None, typer.Option(help="Backend name (default: from the model).")] = None,
    implementation: Annotated[Implementation, typer.Option(help="How the kernel is built.")] = Implementation.AUTO,
    memory_budget: Annotated[str | None, typer.Option(help="Bytes one block may use, e.g. 512MB.")] = None,
    train: Annotated[bool, typer.Option(help="Measure in training mode.")] = False,
    variables: Annotated[str | None, typer.Option(help="Comma list of variables; 'trace' alone never forms the kernel.")] = None,
    method: Annotated[str | None, typer.Option(help="auto, exact or stochastic: trace and entropy with error bars (matrix-free when stochastic).")] = None,
    probes: Annotated[int, typer.Option(help="Probe vectors of a stochastic estimate.")] = 32,
    steps: Annotated[int, typer.Option(help="Lanczos steps per probe.")] = 30,
    top_k: Annotated[int, typer.Option(help="Largest eigenvalues to report with --method.")] = 10,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
    resume: Annotated[bool, typer.Option(help="Skip checkpoints already in --csv.")] = False,
) -> None:
    """Collective variables of checkpoints, one row each, on one probe set."""
    selector: Any = int(output) if output is not None and output.lstrip("-").isdigit() else output
    request = make_request(kernel=kernel, output=selector, dtype=dtype, device=device,
                           train=train, memory_budget=memory_budget,
                           implementation=implementation)
    sink = CsvSink(csv, resume=resume) if csv is not None else None
    if resume and sink is None:
        raise InputError("expected --csv with --resume, got --resume alone")
    log = stderr()
    rows: list[Row] = []
    for row in measure_checkpoints(
        checkpoints, probe=ProbeSpec(data, key, samples, seed), request=request,
        options=LoadOptions(model_factory=model, trust=trust, key=None), backend=backend,
        skip=sink.done if sink else None, variables=parse_variables(variables),
        estimator=None if method is None else {"method": method, "probes": probes, "steps": steps,
                                               "top_k": top_k, "seed": seed},
    ):
        log.print(f"measured {row.source} ({row.seconds:.2f} s)", markup=False)
        rows.append(row)
        if sink is not None:
            sink.add(row)
    emit(rows, as_json, f"collective variables ({kernel} kernel)")


def backends() -> None:
    """List every registered backend, loader and adapter and whether it can run."""
    from rich.console import Console
    from rich.table import Table

    reg = plugins.registry()
    table = Table(title="cvcore plugins")
    for col in ("kind", "name", "available", "install"):
        table.add_column(col)
    for name, b in reg.backends.items():
        ok = b.available()
        table.add_row("backend", name, "yes" if ok else "no", "" if ok else plugins.install_command(b))
    for name, ld in reg.checkpoint_loaders.items():
        ok = ld.available()
        table.add_row("checkpoint loader", name, "yes" if ok else "no", "" if ok else plugins.install_command(ld))
    for name in reg.data_loaders:
        table.add_row("data loader", name, "yes", "")
    for name, a in reg.adapters.items():
        ok = getattr(a, "available", lambda: True)()
        table.add_row("adapter", name, "yes" if ok else "no", "")
    Console(highlight=False, width=120).print(table)


def make_app() -> typer.Typer:
    """Build the ``cv`` application, with commands from every plugin."""
    app = typer.Typer(name="cv", help="Collective variables (NTK trace, entropy, ...) of neural networks.",
                      no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
        _state["debug"] = debug

    app.command()(friendly(spectrum))
    app.command()(friendly(measure))
    app.command("backends")(friendly(backends))
    plugins.manager().hook.cvcore_register_commands(app=app)
    return app


def main() -> None:
    """Console-script entry point."""
    make_app()(prog_name="cv")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
