"""`cv report`: what recorded runs say: start, end, change ± uncertainty, regime, and the
kernel's alignment and motion where they were recorded."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.common import JsonOpt

from cvcore.record.store import RecordStore
from cvcore.record.summary import NO_UNCERTAINTY, summarize
from cvcore.rows import format_number

#: The variables shown in the table (all of them are in --json).
SHOWN = ("entropy", "trace", "effective_rank", "normalized_trace", "target_alignment",
         "residual_alignment", "kernel_distance_init", "eigenspace_overlap_init")


def report(
    stores: Annotated[list[Path], typer.Argument(help="Record stores (.db) written by a Recorder or cv measure --out.")],
    run: Annotated[str | None, typer.Option(help="Only this run (id or name).")] = None,
    boot: Annotated[int, typer.Option(help="Bootstrap the subsets' errors with this many resamples (0: the paired standard error).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap (same seed, same numbers).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Per run and probe set: each variable at start and end, the change with its uncertainty, the regime.

    The uncertainty comes from the probe subsets (paired standard error, or a bootstrap
    with --boot); a run recorded without subsets has none, and the report says so.
    A store with no runs yet (or a run with no records yet) prints one line saying so
    and exits with status 0: it is what a store looks like before a Recorder's first
    record, not a mistake."""
    from cvcore.errors import InputError

    if boot < 0:
        raise InputError(f"expected --boot a non-negative integer, got {boot}")
    summaries: list[dict[str, Any]] = []
    empty: list[Path] = []
    for path in stores:
        with RecordStore(path, create=False) as store:
            found = summarize(store, run, boot=boot, seed=seed)
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


def _entropy_note(group: dict[str, Any], e: dict[str, Any]) -> str:
    sig = group["regime_sigmas"]
    if math.isfinite(sig):
        head = f"{group['regime']} ({sig:.1f} se)"
    else:
        direction = "rose" if e["change"] > 0 else "fell" if e["change"] < 0 else "stayed"
        head = f"undetermined: {direction}, no uncertainty to judge it by"
    return head + f"; min {format_number(e['min'])} at step {e['min_step']}"


def _growth_note(e: dict[str, Any]) -> str:
    return "× " + _pm(e["growth_factor"], e.get("growth_factor_se", math.nan))


def dynamics_line(where: str, d: dict[str, Any]) -> str | None:
    """One sentence on the kernel's alignment and motion, or None when none was recorded."""
    parts = []
    if d.get("alignment_start") is not None:
        parts.append(f"target alignment {format_number(d['alignment_start'])} → "
                     f"{format_number(d['alignment_end'])}")
    if d.get("distance_total") is not None:
        parts.append(f"kernel distance from the start {format_number(d['distance_total'])}")
    if d.get("fastest_step") is not None:
        parts.append(f"fastest motion at step {d['fastest_step']} "
                     f"({format_number(d['fastest_velocity'])} per step)")
    if d.get("overlap_end") is not None:
        parts.append(f"top-eigenspace overlap with the start {format_number(d['overlap_end'])}")
    return f"{where}: " + "; ".join(parts) if parts else None


def _print(summaries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(170, Console().width))
    for s in summaries:
        if not s["records"]:
            console.print(f"run {s['run_id']} {s['run_name']!r}: no records yet", markup=False)
            continue
        cost = s["cost_seconds"]
        about = ", ".join(part for part in (
            f"{format_number(s['n_params'])} parameters" if s["n_params"] is not None else "",
            s["framework"] or "") if part)
        title = (f"run {s['run_id']} {s['run_name']!r}: {s['model_class'] or 'model'}"
                 f"{f' ({about})' if about else ''}, "
                 f"{s['kernel']} kernel, {s['dtype']}; {s['records']} records, steps "
                 f"{s['steps'][0] if s['steps'] else '-'}..{s['steps'][1] if s['steps'] else '-'}"
                 f"{'' if s['finished'] else ' (not closed)'}")
        table = Table(title=title, title_justify="left")
        for col in ("probe set", "variable", "start", "end", "change ± se", "uncertainty",
                    "notes"):
            table.add_column(col, justify="left" if col in ("probe set", "variable",
                                                            "uncertainty", "notes") else "right")
        bare = False
        lines = []
        for group in s["probe_sets"]:
            where = group["probe_set"] + (f" class {group['label']}" if group["label"] else "")
            for var, e in group["variables"].items():
                if var not in SHOWN:
                    continue
                notes = ""
                if var == "entropy":
                    notes = _entropy_note(group, e)
                elif "growth_factor" in e:
                    notes = _growth_note(e)
                bare = bare or e["uncertainty"] is None
                table.add_row(where, var, format_number(e["start"]), format_number(e["end"]),
                              _pm(e["change"], e["change_se"]), e["uncertainty"] or "none",
                              notes)
            line = dynamics_line(where, group.get("dynamics") or {})
            if line:
                lines.append(line)
        console.print(table)
        for line in lines:
            console.print(line, markup=False, soft_wrap=True)
        if bare:
            console.print(f"uncertainty {NO_UNCERTAINTY}: the changes are shown without an "
                          "error; record subsets=(K, n), or compare runs that differ only in "
                          "their seed (cv compare), for one", markup=False, soft_wrap=True)
        loss = s["loss"]
        console.print(
            (f"loss {format_number(loss['start'])} → {format_number(loss['end'])}; " if loss
             else "") + f"recording cost {format_number(cost['total'])} s in all, "
            f"{format_number(cost['mean'])} s per record (max {format_number(cost['max'])} s)")
