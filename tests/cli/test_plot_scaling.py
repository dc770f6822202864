"""`cv scaling`: the target alignment and kernel distance against parameter count, and
readable figures (annotations legible on every cell colour, no "None" or "all" titles,
legends off the curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvcore.record import Record, RecordStore, Value
from cvcore.scaling.figures import text_colour
from cvcore.sweep.config import cell_id
from tests.cli.test_report_support import invoke

WIDTHS = [4, 16, 64]


def sweep_with_dynamics(root: Path) -> dict[tuple[int, int], dict[str, float]]:
    """One-axis sweep (width × seed) whose cells record alignment, distance and velocity;
    returns each cell's hand values."""
    (root / "cells").mkdir(parents=True)
    (root / "sweep.toml").write_text(f'name = "dyn"\n[model]\nfamily = "dense"\ndepth = 2\n[grid]\n'
                                     f'width = {WIDTHS}\nseed = [0, 1, 2]\n')
    truth = {}
    for w in WIDTHS:
        for s in (0, 1, 2):
            params = {"width": w, "seed": s}
            cid = cell_id(params)
            align = [0.2, 0.3 + 0.01 * s, 0.2 + 0.1 * math.log2(w) + 0.02 * s]
            dist = [0.0, 0.05, 0.4 / w + 0.01 * s]
            vel = [math.nan, 0.01, 0.2 / w]
            truth[(w, s)] = {"alignment_end": align[-1], "delta_alignment": align[-1] - 0.2,
                             "kernel_distance": dist[-1],
                             "fastest_step": 10.0 if 0.2 / w > 0.01 else 5.0}
            with RecordStore(root / "cells" / f"{cid}.db") as store:
                run = store.create_run(name=cid, source="recorder", kernel="traced",
                                       dtype="float32", cvcore_version="test",
                                       probe_sets={"train": {"n_samples": 8}})
                for i, step in enumerate((0, 5, 10)):
                    store.add_record(run, Record(step=step, loss=1.0 / (i + 1), values=(
                        Value("train", "entropy", 1.0 + 0.1 * i),
                        Value("train", "trace", 2.0 + i),
                        Value("train", "target_alignment", align[i]),
                        Value("train", "kernel_distance_init", dist[i]),
                        Value("train", "kernel_velocity", vel[i]))))
            (root / "cells" / f"{cid}.json").write_text(json.dumps(
                {"id": cid, "params": params, "status": "done", "n_params": 10 * w * w}))
    return truth


def test_alignment_and_distance_against_parameter_count(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    root = tmp_path / "s"
    truth = sweep_with_dynamics(root)
    result = invoke("scaling", root, "--boot", "20")
    assert result.exit_code == 0, result.output
    summary = json.loads((root / "scaling" / "scaling.json").read_text())
    points = {p["params"]["width"]: p for p in summary["probe_sets"]["train"]["points"]}
    for w in WIDTHS:
        for metric in ("alignment_end", "delta_alignment", "kernel_distance", "fastest_step"):
            seeds = np.asarray([truth[(w, s)][metric] for s in (0, 1, 2)])
            got = points[w][metric]
            assert got["per_seed"] == pytest.approx(seeds, rel=1e-12)
            assert got["mean"] == pytest.approx(seeds.mean(), rel=1e-12)
            if seeds.std() > 0:
                assert got["sem"] == pytest.approx(seeds.std(ddof=1) / math.sqrt(3), rel=1e-12)
    a16 = np.asarray([truth[(16, s)]["alignment_end"] for s in (0, 1, 2)])
    line = f"alignment at the end {a16.mean():.3g} ± {a16.std(ddof=1) / math.sqrt(3):.2g}"
    assert line in result.output and "P = 2.56e+03 (width=16)" in result.output
    assert (root / "scaling" / "dynamics_vs_params_train.png").stat().st_size > 1000


def test_sweeps_without_dynamics_have_no_such_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tests.sweep.test_scaling import write_sweep

    root = write_sweep(tmp_path / "s", lambda p, d, a: math.log10(p) - 3)
    result = invoke("scaling", root, "--boot", "20")
    assert result.exit_code == 0, result.output
    assert "target alignment" not in result.output
    assert not (root / "scaling" / "dynamics_vs_params_train.png").exists()
    points = json.loads((root / "scaling" / "scaling.json").read_text())[
        "probe_sets"]["train"]["points"]
    assert points[0]["alignment_end"]["mean"] is None


def contrast_ratio(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    def lum(c: tuple[float, ...]) -> float:
        r, g, bl = ((x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4)
                    for x in c[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * bl
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("cmap", ["RdBu_r", "viridis", "magma"])
def test_annotation_colour_is_legible_on_every_cell_colour(cmap: str) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    colours = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))
    for rgba in colours:
        chosen = (0.0, 0.0, 0.0) if text_colour(rgba) == "k" else (1.0, 1.0, 1.0)
        other = (1.0, 1.0, 1.0) if chosen == (0.0, 0.0, 0.0) else (0.0, 0.0, 0.0)
        ratio = contrast_ratio(tuple(rgba), chosen)
        assert ratio >= contrast_ratio(tuple(rgba), other) - 1e-12  # the better of the two
        assert ratio >= 4.5  # WCAG AA for normal text


def test_scale_diagram_titles_and_legends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    pytest.importorskip("matplotlib")
    from cvcore.scaling import figures

    kept: list[Any] = []
    real = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (kept.append(
        (fig.axes, [t for ax in fig.axes for t in ax.texts])), real(fig, path))[1])
    root = tmp_path / "s"
    sweep_with_dynamics(root)
    assert invoke("scaling", root, "--boot", "20").exit_code == 0
    for axes_, _texts in kept:
        for ax in axes_:
            assert ax.get_title() not in ("all", "None")
            labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_xticklabels()]
            assert "None" not in labels
            legend = ax.get_legend()
            if legend is not None:  # anchored outside the axes, to their right
                assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1
    diagram_texts = kept[0][1]
    assert diagram_texts, "the scale diagram's cells carry their values"
