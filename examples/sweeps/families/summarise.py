"""Summarise the family studies for docs/families.md.

python examples/sweeps/families/summarise.py runs/families docs/figures/families

Reads each finished study's sweep directory (runs/families/<name>: cell status files,
the config) and its ``cv scaling`` output (docs/figures/families/<name>/scaling.json) and
writes docs/figures/families/summary.json: per study the cell counts, the CPU seconds
measured and estimated, the wall time, and per probe set every grid point's ΔS (mean ±
std over seeds), Δ ln Tr, final loss and score, and every sign change of ΔS. The
markdown tables of docs/families.md are made from that file by :func:`table`
(tests/sweep/test_families_study.py checks that the page holds them as made).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STUDIES = ("vit", "transformer", "ssm", "gnn", "gnn-graphs", "autoencoder", "vae", "rl")
SCORE = {"rl": "episode_reward", "autoencoder": "test_mse", "vae": "test_mse"}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def study(runs: Path, figures: Path, name: str, walls: dict[str, float]) -> dict[str, Any] | None:
    from cvcore.sweep import budget
    from cvcore.sweep.run import load_sweep_config

    root, scaling = runs / name, figures / name / "scaling.json"
    if not scaling.is_file() or not (root / "sweep.toml").is_file():
        return None
    config = load_sweep_config(root)
    shape = budget.check_data(config)
    statuses = {}
    for cell in config.cells():
        path = root / "cells" / f"{cell.id}.json"
        if path.is_file():
            statuses[cell.id] = (cell, json.loads(path.read_text()))
    done = {k: v for k, v in statuses.items() if v[1].get("status") == "done"}
    cpu = sum(s.get("cpu_seconds", 0.0) for _, s in done.values())
    estimate = sum(budget.cell_seconds(config, c, shape) for c, _ in done.values())
    analysis = json.loads(scaling.read_text())["probe_sets"]
    score_key = SCORE.get(config.family, "test_accuracy")
    out: dict[str, Any] = {
        "family": config.family, "dataset": config.data.dataset, "cells": len(config.cells()),
        "done": len(done), "cpu_seconds": round(cpu, 1), "estimated_cpu_seconds": round(estimate, 1),
        "wall_seconds": walls.get(name), "score": score_key, "probe_sets": {}}
    for probe, result in analysis.items():
        points = []
        for p in result["points"]:
            members = [s for c, s in done.values()
                       if all(c.params.get(k) == v for k, v in p["params"].items())]
            score = _mean([s.get("final", {}).get(score_key) for s in members])
            points.append({"params": p["params"], "n_params": p["n_params"],
                           "seeds": len(p["seeds"]), "delta_S": p["delta_S"]["mean"],
                           "delta_S_std": p["delta_S"]["std"],
                           "delta_S_sem": p["delta_S"]["sem"],
                           "delta_S_min": p["delta_S_min"]["mean"],
                           "delta_ln_trace": p["delta_ln_trace"]["mean"],
                           "final_loss": p["final_loss"]["mean"], "score": score})
        changes = [{"along": c["along"], "fixed": c["fixed"], "direction": c["direction"],
                    "P": c["P"], "support": c["support"], "within_noise": c["within_noise"]}
                   for c in result["sign_changes"]]
        out["probe_sets"][probe] = {"points": points, "sign_changes": changes}
    return out


def table(summary: dict[str, Any], probe: str) -> str:
    """The page's table of one study's probe set: one row per grid point."""
    s = summary["probe_sets"][probe]
    keys = [k for k in s["points"][0]["params"]]
    head = "| " + " | ".join(keys) + " | P | ΔS ± std | S(end) − min S | Δ ln Tr | " \
        + summary["score"].replace("_", " ") + " |"
    rows = [head, "|" + "---|" * (len(keys) + 5)]
    for p in sorted(s["points"], key=lambda p: [str(p["params"][k]) for k in keys[2:]]
                    + [p["n_params"]]):
        std = "" if p["delta_S_std"] is None else f" ± {p['delta_S_std']:.2f}"
        score = "–" if p["score"] is None else f"{p['score']:.3g}"
        rows.append("| " + " | ".join(str(p["params"][k]) for k in keys)
                    + f" | {p['n_params']:.3g} | {_fmt(p['delta_S'])}{std} | "
                      f"{_fmt(p['delta_S_min'])} | {_fmt(p['delta_ln_trace'])} | {score} |")
    return "\n".join(rows)


def times_table(summary: dict[str, Any]) -> str:
    """The page's table of cells, CPU seconds (measured and estimated) and wall time."""
    rows = ["| study | cells done | parameters | CPU s measured | CPU s estimated | wall s (2 workers) |",
            "|---|---|---|---|---|---|"]
    for name, one in summary.items():
        counts = [p["n_params"] for p in next(iter(one["probe_sets"].values()))["points"]]
        wall = "–" if one["wall_seconds"] is None else f"{one['wall_seconds']:.0f}"
        rows.append(f"| {name} | {one['done']} of {one['cells']} | {min(counts):.3g} – "
                    f"{max(counts):.3g} | {one['cpu_seconds']:.0f} | "
                    f"{one['estimated_cpu_seconds']:.0f} | {wall} |")
    return "\n".join(rows)


def main(runs: str, figures: str) -> None:
    walls: dict[str, float] = {}
    wall_file = Path(figures) / "walls.txt"
    if wall_file.is_file():
        for line in wall_file.read_text().splitlines():
            name, seconds = line.split()
            walls[name] = float(seconds)
    summary = {}
    for name in STUDIES:
        one = study(Path(runs), Path(figures), name, walls)
        if one is not None:
            summary[name] = one
    from cvcore.files import write_text_atomic

    write_text_atomic(Path(figures) / "summary.json", json.dumps(summary, indent=1))
    print(times_table(summary))
    for name, one in summary.items():
        for probe in one["probe_sets"]:
            print(f"\n### {name} ({probe})\n\n{table(one, probe)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
