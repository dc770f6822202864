"""`cv report`: what recorded runs say: start, end, change ± uncertainty, regime."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.common import JsonOpt

from cvcore.record.store import RecordStore
from cvcore.record.summary import summarize
from cvcore.rows import format_number

#: The variables shown in the table (all of them are in --json).
SHOWN = ("entropy", "trace", "effective_rank", "normalized_trace")


def report(
    stores: Annotated[list[Path], typer.Argument(help="Record stores (.db) written by a Recorder or cv measure --out.")],
    run: Annotated[str | None, typer.Option(help="Only this run (id or name).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per run and probe set: each variable at start and end, the change with its uncertainty, the regime.

    A store with no runs yet (or a run with no records yet) prints one line saying so
    and exits with status 0: it is what a store looks like before a Recorder's first
    record, not a mistake."""
    summaries: list[dict[str, Any]] = []
    empty: list[Path] = []
    for path in stores:
        with RecordStore(path, create=False) as store:
            found = summarize(store, run)
        if not found:
            empty.append(path)
        summaries.extend(found)
    if as_json:
        sys.stdout.write(json.dumps(_finite(summaries), indent=2) + "\n")
        for path in empty:  # stdout stays JSON
            typer.echo(f"{path}: no records yet", err=True)
        return
    for path in empty:
        typer.echo(f"{path}: no records yet")
    _print(summaries)


def _finite(value: Any) -> Any:
    """NaN and Inf as null, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _pm(value: float, se: float) -> str:
    text = format_number(value)
    return text if not math.isfinite(se) else f"{text} ± {format_number(se)}"


def _print(summaries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(140, Console().width))
    for s in summaries:
        if not s["records"]:
            console.print(f"run {s['run_id']} {s['run_name']!r}: no records yet", markup=False)
            continue
        cost = s["cost_seconds"]
        title = (f"run {s['run_id']} {s['run_name']!r}: {s['model_class'] or 'model'} "
                 f"({format_number(s['n_params'])} parameters, {s['framework']}), "
                 f"{s['kernel']} kernel, {s['dtype']}; {s['records']} records, steps "
                 f"{s['steps'][0] if s['steps'] else '-'}..{s['steps'][1] if s['steps'] else '-'}"
                 f"{'' if s['finished'] else ' (not closed)'}")
        table = Table(title=title, title_justify="left")
        for col in ("probe set", "variable", "start", "end", "change ± se", "uncertainty",
                    "notes"):
            table.add_column(col, justify="left" if col in ("probe set", "variable",
                                                            "uncertainty", "notes") else "right")
        for group in s["probe_sets"]:
            where = group["probe_set"] + (f" class {group['label']}" if group["label"] else "")
            for var, e in group["variables"].items():
                if var not in SHOWN:
                    continue
                notes = ""
                if var == "entropy":
                    sig = group["regime_sigmas"]
                    notes = (f"{group['regime']}"
                             + (f" ({sig:.1f} se)" if math.isfinite(sig) else "")
                             + f"; min {format_number(e['min'])} at step {e['min_step']}")
                elif "growth_factor" in e:
                    notes = f"× {format_number(e['growth_factor'])}"
                table.add_row(where, var, format_number(e["start"]), format_number(e["end"]),
                              _pm(e["change"], e["change_se"]), e["uncertainty"] or "none",
                              notes)
        console.print(table)
        loss = s["loss"]
        console.print(
            (f"loss {format_number(loss['start'])} → {format_number(loss['end'])}; " if loss
             else "") + f"recording cost {format_number(cost['total'])} s in all, "
            f"{format_number(cost['mean'])} s per record (max {format_number(cost['max'])} s)")
