"""`cv measure`: collective variables of checkpoints, one row each, on one probe set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.common import CsvOpt, JsonOpt, emit
from cvcore.cli.output import stderr

from cvcore.api import make_request, parse_variables
from cvcore.errors import InputError
from cvcore.protocols import Implementation, LoadOptions
from cvcore.record.checkpoints import CheckpointSink
from cvcore.report import CsvSink, Row
from cvcore.runs import ProbeSpec, measure_checkpoints


def measure(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints, measured in natural order.")],
    data: Annotated[str | None, typer.Option(help="Probe inputs: .npy, .npz, .pt, a bundled dataset (digits, iris), or env:ID (observations rolled out by an RL policy in that Gymnasium environment).")] = None,
    key: Annotated[str | None, typer.Option(help="Array name inside an .npz data file.")] = None,
    samples: Annotated[int | None, typer.Option(help="Draw this many probe inputs at random.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the probe subset (same seed, same subset).")] = 0,
    model: Annotated[str | None, typer.Option("--model", help="package.module:factory that builds the architecture for a state_dict.")] = None,
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
    resume: Annotated[bool, typer.Option(help="Skip checkpoints already in --csv.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the series to a record store (.db), one run.")] = None,
    per_layer: Annotated[bool, typer.Option(help="Also one row per layer (trace, share, entropy, effective rank of its own kernel); --csv then has one line per layer.")] = False,
) -> None:
    """Collective variables of checkpoints, one row each, on one probe set."""
    selector: Any = int(output) if output is not None and output.lstrip("-").isdigit() else output
    request = make_request(kernel=kernel, output=selector, dtype=dtype, device=device,
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
        sketch = {"projections": projections, "target_error": target_error, "seed": seed,
                  "progress": lambda line: stderr().print(line, markup=False)}
    sink = CsvSink(csv, resume=resume) if csv is not None and not per_layer else None
    if resume and sink is None:
        raise InputError("expected --csv with --resume, got --resume alone")
    store = None if out is None else CheckpointSink(
        out, probe={"data": data, "key": key, "samples": samples, "seed": seed})
    log = stderr()
    rows: list[Row] = []
    for row in measure_checkpoints(
        checkpoints, probe=ProbeSpec(data, key, samples, seed), request=request,
        options=LoadOptions(model_factory=model, trust=trust, key=None, max_length=max_length),
        backend=backend, sketch=sketch,
        skip=sink.done if sink else None, variables=parse_variables(variables),
        estimator=None if method is None else {"method": method, "probes": probes, "steps": steps,
                                               "top_k": top_k, "seed": seed},
        per_layer=per_layer,
    ):
        log.print(f"measured {row.source} ({row.seconds:.2f} s)", markup=False)
        rows.append(row)
        if sink is not None:
            sink.add(row)
        if store is not None:
            store.add(row)
    if store is not None:
        store.close()
    if per_layer and csv is not None:
        from cvcore.cli.per_layer import write_layer_csv

        write_layer_csv(csv, rows)
    emit(rows, as_json, f"collective variables ({kernel} kernel)")
    if per_layer and not as_json:
        from cvcore.cli.per_layer import print_layers

        print_layers(rows)
