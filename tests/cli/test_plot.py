"""`cv plot`: seeds pooled into a mean and a band, Tr K / N when probe sizes differ, the
user's logged curves, the kernel's alignment and velocity, and the spectrum over time; the
drawn numbers are checked against the stored values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvcore.record import Record, RecordStore, Value
from cvcore.record.schema import ArrayValue
from tests.cli.test_report_support import invoke, per_subset_table, plain_run, subset_run

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures `cv plot` draws, kept open for inspection (the file is still written)."""
    import matplotlib.pyplot as plt

    from cvcore.record import plotting

    kept: list[Any] = []
    real = plotting._save

    def save(plt_: Any, fig: Any, out: Path) -> Path:
        kept.append(fig)
        monkeypatch.setattr(plt_, "close", lambda *a: None)
        return real(plt_, fig, out)

    monkeypatch.setattr(plotting, "_save", save)
    yield kept
    for fig in kept:
        plt.close(fig)


def panel(fig: Any, title: str) -> Any:
    found = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    assert found, [ax.get_title() for ax in fig.axes]
    return found[0]


def test_seeds_are_drawn_as_mean_and_band(tmp_path: Path, figures: list[Any]) -> None:
    rng = np.random.default_rng(4)
    path = tmp_path / "seeds.db"
    tables = []
    with RecordStore(path) as store:
        for seed in (0, 1, 2):
            t = {"entropy": per_subset_table(rng, 5, 4, 1.0, 2.0, 0.1)}
            tables.append(t)
            subset_run(store, f"seed {seed}", t, tags={"width": 8, "seed": seed},
                       loss=list(np.linspace(2.0, 0.5, 5) + seed * 0.1),
                       extras=[{"accuracy": 0.2 + 0.1 * i + 0.01 * seed, "source": "x"}
                               for i in range(5)])
    out = tmp_path / "fig.png"
    result = invoke("plot", path, "--out", out)
    assert result.exit_code == 0, result.output
    fig = figures[0]
    ent = panel(fig, "NTK entropy")
    assert len(ent.lines) == 1  # three seeds, one line
    means = np.stack([t["entropy"].mean(axis=1) for t in tables])  # per seed, per step
    np.testing.assert_allclose(ent.lines[0].get_ydata(), means.mean(axis=0), rtol=1e-12)
    band = ent.collections[0].get_paths()[0].vertices[:, 1]
    hi = means.mean(axis=0) + means.std(axis=0, ddof=1)
    assert np.max(band) == pytest.approx(hi.max(), rel=1e-12)
    assert "mean ± std over seeds" in ent.lines[0].get_label()
    acc = panel(fig, "logged: accuracy")  # the user's own curve, pooled over seeds too
    np.testing.assert_allclose(acc.lines[0].get_ydata(),
                               [0.2 + 0.1 * i + 0.01 for i in range(5)], rtol=1e-12)
    assert not [ax for ax in fig.axes if "source" in ax.get_title()]
    assert fig.legends and not ent.get_legend()  # the legend sits below the panels


def test_different_probe_sizes_show_the_trace_per_sample(tmp_path: Path,
                                                         figures: list[Any]) -> None:
    path = tmp_path / "sizes.db"
    with RecordStore(path) as store:
        plain_run(store, "small", {"entropy": [1.0, 1.5], "trace": [80.0, 160.0]}, n=8)
        plain_run(store, "large", {"entropy": [1.2, 1.6], "trace": [400.0, 900.0]}, n=40)
    result = invoke("plot", path, "--out", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    trace = panel(figures[0], "NTK trace per probe sample")
    assert trace.get_ylabel() == "Tr K / N"
    ys = {line.get_label(): list(line.get_ydata()) for line in trace.lines}
    assert ys == {"small (N=8)": [10.0, 20.0], "large (N=40)": [10.0, 22.5]}


def test_alignment_velocity_and_spectrum_panels(tmp_path: Path, figures: list[Any]) -> None:
    path = tmp_path / "dyn.db"
    top = np.asarray([[4.0, 2.0, 1.0], [8.0, 3.0, 0.5], [16.0, 2.0, 0.25]])
    with RecordStore(path) as store:
        run = store.create_run(name="dyn", source="recorder", kernel="traced",
                               dtype="float64", cvcore_version="test",
                               probe_sets={"train": {"n_samples": 10, "subsets": None}})
        for i, step in enumerate((0, 5, 10)):
            values = (Value("train", "entropy", 1.0 + 0.1 * i),
                      Value("train", "trace", 10.0 * (i + 1)),
                      Value("train", "target_alignment", 0.1 * (i + 1)),
                      Value("train", "kernel_velocity", [math.nan, 0.02, 0.01][i]))
            arrays = (ArrayValue("train", "top_eigenvalues", tuple(top[i])),)
            store.add_record(run, Record(step=step, values=values, arrays=arrays, loss=1.0 / (i + 1)))
    result = invoke("plot", path, "--out", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    fig = figures[0]
    align = panel(fig, "target alignment")
    np.testing.assert_allclose(align.lines[0].get_ydata(), [0.1, 0.2, 0.3])
    vel = panel(fig, "kernel velocity")
    np.testing.assert_allclose(vel.lines[0].get_ydata()[1:], [0.02, 0.01])
    assert vel.get_yscale() == "log"
    spec = panel(fig, "top eigenvalues")
    mesh = spec.collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(3, 3),
                               np.log10(top).T, rtol=1e-12)  # rows: eigenvalue index


def test_a_run_without_dynamics_has_the_three_panels(tmp_path: Path,
                                                     figures: list[Any]) -> None:
    path = tmp_path / "plain.db"
    with RecordStore(path) as store:
        plain_run(store, "p", {"entropy": [1.0, 1.5], "trace": [8.0, 16.0]})
    assert invoke("plot", path, "--out", tmp_path / "f.png").exit_code == 0
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_visible()]
    assert titles == ["NTK entropy", "NTK trace", "training loss"]
