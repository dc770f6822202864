"""`cv compare`: recorded runs side by side: each one's change ± se, seeds pooled, and the
differences from the first with theirs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.common import JsonOpt
from cvcore.cli.report import SHOWN, _finite, _pm

from cvcore.errors import InputError
from cvcore.record.compare import compare_runs, load_runs
from cvcore.rows import format_number


def compare(
    stores: Annotated[list[Path], typer.Argument(help="Record stores (.db); every run in each is compared.")],
    run: Annotated[str | None, typer.Option(help="Only this run (id or name) of each store.")] = None,
    boot: Annotated[int, typer.Option(help="Bootstrap each run's subset errors with this many resamples (0: paired standard error).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Each run's change in every variable with its uncertainty (runs that differ only in
    their seed pooled: mean ± se over seeds), and each one's difference from the first."""
    if boot < 0:
        raise InputError(f"expected --boot a non-negative integer, got {boot}")
    result = compare_runs(load_runs(stores, run), boot=boot, seed=seed)
    if as_json:
        sys.stdout.write(json.dumps(_finite(result), indent=2) + "\n")
        return
    _print(result)


def _text(item: dict[str, Any]) -> str:
    return str(_pm(item["value"], item["se"]))


def _kind(uncertainty: str | None) -> str:
    if uncertainty is None:
        return "none"
    return "seeds" if uncertainty.endswith("seeds") else "subsets"


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(180, Console().width))
    groups = result["groups"]
    console.print(f"{len(groups)} groups; differences are against the first, "
                  f"{result['reference']!r}", markup=False)
    table = Table(title_justify="left")
    for col in ("probe set", "variable", "run", "start", "end", "change ± se", "uncertainty",
                "difference ± se", "notes"):
        table.add_column(col, justify="left" if col in ("probe set", "variable", "run",
                                                        "uncertainty", "notes") else "right")
    wheres = list(dict.fromkeys(w for g in groups for w in g["changes"]))
    for where in wheres:
        variables = list(dict.fromkeys(v for g in groups for v in g["changes"].get(where, {})))
        for var in variables:
            if var not in SHOWN:
                continue
            for g in groups:
                item = g["changes"].get(where, {}).get(var)
                if item is None:
                    continue
                diff = item.get("difference", {}).get("change")
                notes = []
                if "regime" in item:
                    notes.append(item["regime"])
                if diff is not None:
                    notes.append(diff["verdict"] + (f" ({diff['sigmas']:.1f} se)"
                                                    if math.isfinite(diff["sigmas"]) else ""))
                if "log_change" in item:
                    notes.append(f"Δ ln Tr {_text(item['log_change'])}")
                table.add_row(where, var, g["label"], format_number(item["start"]["value"]),
                              format_number(item["end"]["value"]), _text(item["change"]),
                              item["change"]["uncertainty"] or "none",
                              _text(diff) if diff is not None else "reference" if g is groups[0]
                              else "", "; ".join(notes))
    console.print(table)
    kinds = {_kind(item["change"]["uncertainty"]) for g in groups
             for variables in g["changes"].values() for item in variables.values()}
    if "seeds" in kinds and "subsets" in kinds:
        console.print("some groups' errors come from seeds, others' from probe subsets of "
                      "one run: a subsets-only error leaves out the seed-to-seed spread, so "
                      "a difference against it can look more certain than it is",
                      markup=False, soft_wrap=True)
    if result["probe_sizes_differ"]:
        console.print("the runs' probe sizes differ: the trace grows with N, so compare its "
                      "Δ ln Tr (or normalized_trace), not its change",
                      markup=False, soft_wrap=True)
    if any(item["change"]["uncertainty"] is None for g in groups
           for variables in g["changes"].values() for item in variables.values()):
        console.print("uncertainty none: a single run without subsets has no error; a "
                      "difference involving it has none either", markup=False, soft_wrap=True)
