"""Summarise the open checks (optimizer grids and depth-3 ablations) for docs/families.md.

python examples/sweeps/ablations/summarise.py runs/ablations docs/figures/ablations

Reads each finished study's sweep directory (runs/ablations/<name>) and its ``cv scaling``
output (docs/figures/ablations/<name>/scaling.json), as the family studies' summariser
does (its :func:`study` is reused), and writes docs/figures/ablations/summary.json. The
page's tables are made from that file by :func:`table` (one study, one row per grid
point), :func:`pivot` (ΔS ± std with one column per optimizer or per ablated setting),
:func:`changes_table` (sign changes of ΔS with their bootstrap support) and
:func:`times_table`; tests/sweep/test_ablations_study.py checks that the page holds them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("opt-adam", "opt-adamw", "opt-sgd", "opt-sgd-momentum")
ABLATIONS = {"init": "init", "batch": "batch_size", "schedule": "schedule"}
MATCHED = ("matched-vit", "matched-transformer", "matched-ssm")
STUDIES = OPTIMIZERS + tuple(ABLATIONS) + MATCHED


def _families() -> Any:
    spec = importlib.util.spec_from_file_location(
        "families_summarise", HERE.parent / "families" / "summarise.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FAMILIES = _families()
table = _FAMILIES.table
times_table = _FAMILIES.times_table


def _cell(p: dict[str, Any], field: str = "delta_S") -> str:
    if field != "delta_S":
        return _FAMILIES._fmt(p[field])
    std = "" if p["delta_S_std"] is None else f" ± {p['delta_S_std']:.2f}"
    return "–" if p["delta_S"] is None else f"{p['delta_S']:+.2f}{std}"


def pivot(summary: dict[str, Any], columns: dict[str, tuple[str, str, Any]], probe: str,
          rows: tuple[str, ...] = ("depth", "width"), field: str = "delta_S") -> str:
    """ΔS ± std (seeds) per grid point, one column per (study, axis, value): the same grid
    point under each optimizer, or under each setting of an ablated axis. With ``field``
    another per-point number (the seed mean of ``delta_ln_trace``, ``delta_S_min``)."""
    cells: dict[tuple[Any, ...], dict[str, str]] = {}
    sizes: dict[tuple[Any, ...], float] = {}
    for label, (name, axis, value) in columns.items():
        if name not in summary:
            continue
        for p in summary[name]["probe_sets"][probe]["points"]:
            if axis and p["params"].get(axis) != value:
                continue
            key = tuple(p["params"][r] for r in rows)
            cells.setdefault(key, {})[label] = _cell(p, field)
            sizes[key] = p["n_params"]
    head = "| " + " | ".join(rows) + " | P | " + " | ".join(columns) + " |"
    out = [head, "|" + "---|" * (len(rows) + 1 + len(columns))]
    for key in sorted(cells):
        out.append("| " + " | ".join(str(k) for k in key) + f" | {sizes[key]:.3g} | "
                   + " | ".join(cells[key].get(c, "–") for c in columns) + " |")
    return "\n".join(out)


def changes_table(summary: dict[str, Any], probe: str, names: tuple[str, ...]) -> str:
    """Every sign change of ΔS along width or depth, with its bootstrap support."""
    out = ["| study | along | fixed | direction | P at the change | support | within noise |",
           "|---|---|---|---|---|---|---|"]
    for name in names:
        if name not in summary:
            continue
        for c in summary[name]["probe_sets"][probe]["sign_changes"]:
            fixed = ", ".join(f"{k}={v}" for k, v in c["fixed"].items())
            out.append(f"| {name} | {c['along']} | {fixed} | {c['direction']} | "
                       f"{c['P']:.3g} | {c['support']:.2f} | "
                       f"{'yes' if c['within_noise'] else 'no'} |")
    return "\n".join(out)


def matched_table(summary: dict[str, Any], probe: str) -> str:
    """The matched families side by side: per family and size level (smallest first) the
    parameter count, ΔS ± std, Δ ln Tr and the final training loss."""
    out = ["| family | width | P | ΔS ± std | S(end) − min S | Δ ln Tr | final loss |",
           "|---|---|---|---|---|---|---|"]
    for name in MATCHED:
        if name not in summary:
            continue
        for p in sorted(summary[name]["probe_sets"][probe]["points"],
                        key=lambda p: p["n_params"]):
            loss = "–" if p["final_loss"] is None else f"{p['final_loss']:.3g}"
            out.append(f"| {name.removeprefix('matched-')} | {p['params']['width']} | "
                       f"{p['n_params']:.3g} | {_cell(p)} | "
                       f"{_FAMILIES._fmt(p['delta_S_min'])} | "
                       f"{_FAMILIES._fmt(p['delta_ln_trace'])} | {loss} |")
    return "\n".join(out)


def optimizer_columns() -> dict[str, tuple[str, str, Any]]:
    return {name.removeprefix("opt-"): (name, "", None) for name in OPTIMIZERS}


def ablation_columns(summary: dict[str, Any], name: str) -> dict[str, tuple[str, str, Any]]:
    axis = ABLATIONS[name]
    values: list[Any] = []
    for p in summary[name]["probe_sets"]["train"]["points"]:
        if p["params"][axis] not in values:
            values.append(p["params"][axis])
    return {f"{axis}={v}": (name, axis, v) for v in values}


def main(runs: str, figures: str) -> None:
    walls: dict[str, float] = {}
    wall_file = Path(figures) / "walls.txt"
    if wall_file.is_file():
        for line in wall_file.read_text().splitlines():
            name, seconds = line.split()[:2]
            walls[name] = float(seconds)
    summary = {}
    for name in STUDIES:
        one = _FAMILIES.study(Path(runs), Path(figures), name, walls)
        if one is not None:
            summary[name] = one
    from cvcore.files import write_text_atomic

    write_text_atomic(Path(figures) / "summary.json", json.dumps(summary, indent=1))
    print(times_table(summary))
    for probe in ("train", "test"):
        print(f"\n### optimizers ({probe})\n\n{pivot(summary, optimizer_columns(), probe)}")
        print(f"\n{changes_table(summary, probe, OPTIMIZERS)}")
        print(f"\nΔ ln Tr\n\n{pivot(summary, optimizer_columns(), probe, field='delta_ln_trace')}")
        for name in ABLATIONS:
            if name in summary:
                print(f"\n### {name} ({probe})\n\n"
                      f"{pivot(summary, ablation_columns(summary, name), probe)}")
                print("\nΔ ln Tr\n\n" + pivot(summary, ablation_columns(summary, name), probe,
                                                field="delta_ln_trace"))
        print(f"\n{changes_table(summary, probe, tuple(ABLATIONS))}")
        print(f"\n### matched ({probe})\n\n{matched_table(summary, probe)}")
        print(f"\n{changes_table(summary, probe, MATCHED)}")
    for name, one in summary.items():
        print(f"\n### {name} (train)\n\n{table(one, 'train')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
