"""cv scaling's analysis against hand-built sweeps whose answers are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cvcore.record import Record, RecordStore, Value
from cvcore.scaling import analyse, load_sweep, points
from cvcore.scaling.analysis import lines, log_fits, monotone_runs, sign_changes
from cvcore.sweep.config import cell_id

WIDTHS = [4, 16, 64, 256, 1024]


def n_params_of(width: int) -> int:
    return 10 * width * width  # any increasing count: the analysis only reads it


def write_sweep(root: Path, delta, *, seeds=(0, 1, 2), noise=(-0.05, 0.0, 0.05),
                depths=(1,), activations=("relu",), steps=(0, 5, 10), loss=None,
                record_loss=True) -> Path:
    """A sweep directory with one store per cell whose entropy goes from 1.0 at step 0 to
    1.0 + delta(P, depth, activation) + noise[seed] at the last step, dipping to 0.5 in
    between; trace from 2.0 to 2.0·e^(0.1·depth); loss given by ``loss(P)``."""
    toml = (f'name = "hand"\n[model]\nfamily = "dense"\n[grid]\nwidth = {WIDTHS}\n'
            f'depth = {list(depths)}\nactivation = {json.dumps(list(activations))}\n'
            f'seed = {list(seeds)}\n')
    (root / "cells").mkdir(parents=True)
    (root / "sweep.toml").write_text(toml)
    for w in WIDTHS:
        for d in depths:
            for a in activations:
                for k, s in enumerate(seeds):
                    params = {"width": w, "depth": d, "activation": a, "seed": s}
                    cid = cell_id(params)
                    p = n_params_of(w) * d
                    end = 1.0 + delta(p, d, a) + noise[k]
                    entropies = [1.0] + [0.5] * (len(steps) - 2) + [end]
                    traces = [2.0] + [2.5] * (len(steps) - 2) + [2.0 * math.exp(0.1 * d)]
                    with RecordStore(root / "cells" / f"{cid}.db") as store:
                        run = store.create_run(name=cid, source="recorder", kernel="traced",
                                               dtype="float32", cvcore_version="test",
                                               probe_sets={"train": {"n_samples": 8}})
                        for step, e, t in zip(steps, entropies, traces, strict=True):
                            final = loss(p) if loss else 1.0
                            store.add_record(run, Record(
                                step=step, loss=(final if step == steps[-1] else 3.0)
                                if record_loss else None,
                                extras={"test_loss": 2 * final},
                                values=(Value("train", "entropy", e),
                                        Value("train", "trace", t))))
                    (root / "cells" / f"{cid}.json").write_text(json.dumps(
                        {"id": cid, "params": params, "status": "done", "n_params": p}))
    return root


def test_one_sign_change_at_a_known_place(tmp_path):
    # ΔS = log10 P − 3 (+ seed noise that averages to zero): negative below P = 1000,
    # positive above; the straight line in log10 P crosses zero at exactly 3.
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: math.log10(p) - 3))
    result = analyse(sweep, n_boot=400)
    assert len(result["sign_changes"]) == 1
    ch = result["sign_changes"][0]
    assert ch["along"] == "width"
    assert ch["direction"] == "compression→structure"
    assert ch["log10_P"] == pytest.approx(3.0, abs=1e-12)
    assert [b["width"] for b in ch["between"]] == [4, 16]  # P = 160 and 2560
    assert ch["support"] == 1.0  # noise 0.05 never flips a point ~0.4 from zero
    lo, hi = ch["P_95"]
    assert lo < 1000 < hi and hi / lo < 1.3
    assert not ch["within_noise"]


def test_both_directions_are_reported(tmp_path):
    # ΔS > 0 in the middle only: two changes, up then down.
    centre = math.log10(n_params_of(64))
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: 0.6 - abs(math.log10(p) - centre)))
    changes = analyse(sweep, n_boot=200)["sign_changes"]
    assert [c["direction"] for c in changes] == ["compression→structure",
                                                 "structure→compression"]
    # symmetric about the centre: crossings at centre ± 0.6 in log10 P
    assert changes[0]["log10_P"] == pytest.approx(centre - 0.6, abs=1e-12)
    assert changes[1]["log10_P"] == pytest.approx(centre + 0.6, abs=1e-12)


def test_noise_larger_than_the_signal_lowers_support(tmp_path):
    # the two points next to the change are within ±0.01 of zero, seeds spread ±0.5
    values = {4: -1.0, 16: -0.01, 64: 0.01, 256: 1.0, 1024: 1.0}
    by_p = {n_params_of(w): v for w, v in values.items()}
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: by_p[p], noise=(-0.5, 0.0, 0.5)))
    ch = analyse(sweep, n_boot=2000)["sign_changes"]
    assert len(ch) == 1
    assert 0.1 < ch[0]["support"] < 0.9
    assert ch[0]["within_noise"]


def test_endpoints_minimum_and_trace(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: 0.2, noise=(0.0, 0.0, 0.0),
                                   steps=(0, 3, 7, 10), depths=(2,)))
    pt = points(sweep.cells, "train")[0]
    assert pt.mean("delta_S") == pytest.approx(0.2)
    assert pt.mean("delta_S_min") == pytest.approx(1.2 - 0.5)  # end minus the dip
    assert pt.mean("min_step") == 3  # the first step at the minimum
    assert pt.mean("delta_ln_trace") == pytest.approx(0.2)
    assert pt.std("delta_S") == pytest.approx(0.0, abs=1e-12)


def test_power_law_of_the_final_loss(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: 0.1, loss=lambda p: 2 * p ** -0.5))
    fit = analyse(sweep, n_boot=10)["loss_power_law"][0]
    assert fit["exponent"] == pytest.approx(-0.5, abs=1e-12)
    assert fit["prefactor"] == pytest.approx(2.0, rel=1e-9)
    assert fit["exponent_se"] == pytest.approx(0.0, abs=1e-9)
    assert fit["n"] == len(WIDTHS) * 3


def test_power_law_uncertainty_matches_ordinary_least_squares():
    rng = np.random.default_rng(3)
    x = np.linspace(1, 4, 12)
    y = 0.7 - 0.3 * x + rng.normal(0, 0.05, x.size)
    from cvcore.scaling import linear_fit

    fit = linear_fit(x, y)
    # reference: the textbook formulas for simple linear regression
    b = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    a = y.mean() - b * x.mean()
    s2 = ((y - a - b * x) ** 2).sum() / (x.size - 2)
    assert fit["slope"] == pytest.approx(b, rel=1e-10)
    assert fit["slope_se"] == pytest.approx(math.sqrt(s2 / ((x - x.mean()) ** 2).sum()),
                                            rel=1e-10)


def test_log_fit_only_where_monotone(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: 0.3 * math.log(p) - 2))
    fits = analyse(sweep, n_boot=10)["delta_S_vs_ln_P"]
    assert len(fits) == 1
    assert fits[0]["slope_per_ln_P"] == pytest.approx(0.3, abs=1e-12)
    assert fits[0]["direction"] == "increasing"
    pts = points(sweep.cells, "train")
    (_, line), = lines(pts, "width")
    assert log_fits(line)[0]["n"] == 15


def test_monotone_runs():
    assert monotone_runs([1, 2, 3, 2, 1, 0]) == [(0, 2), (2, 5)]
    assert monotone_runs([1, 2, 1, 2]) == []
    assert monotone_runs([0, 0, 1, 2]) == [(0, 3)]


def test_lines_per_depth_and_activation(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: math.log10(p) - 3 - (a == "tanh"),
                                   depths=(1, 2), activations=("relu", "tanh")))
    result = analyse(sweep, n_boot=100)
    assert result["size_axes"] == ["width", "depth"]
    assert result["group_axes"] == ["activation"]
    along_width = [c for c in result["sign_changes"] if c["along"] == "width"]
    by_line = {(c["fixed"]["depth"], c["fixed"]["activation"]): c["log10_P"] for c in along_width}
    # relu crosses at P = 10^3, tanh at 10^4; P counts the depth factor
    assert by_line[(1, "relu")] == pytest.approx(3.0, abs=1e-12)
    assert by_line[(2, "relu")] == pytest.approx(3.0, abs=1e-12)
    assert by_line[(1, "tanh")] == pytest.approx(4.0, abs=1e-12)
    assert len(result["loss_power_law_pooled"]) == 2


def test_a_failed_cell_is_listed_not_analysed(tmp_path):
    root = write_sweep(tmp_path, lambda p, d, a: 0.1)
    cid = cell_id({"width": 4, "depth": 1, "activation": "relu", "seed": 0})
    (root / "cells" / f"{cid}.json").write_text(json.dumps(
        {"id": cid, "status": "failed", "error": "RuntimeError: boom"}))
    sweep = load_sweep(root)
    assert [f["id"] for f in sweep.failed] == [cid]
    assert len(sweep.cells) == len(WIDTHS) * 3 - 1


def test_sign_changes_of_one_seed_have_no_spread(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, lambda p, d, a: math.log10(p) - 3, seeds=(0,),
                                   noise=(0.0,)))
    (_, line), = lines(points(sweep.cells, "train"), "width")
    (ch,) = sign_changes(line, n_boot=50)
    assert ch["log10_P_std"] == pytest.approx(0.0, abs=1e-12)
    assert ch["within_noise"]  # no standard error from one seed: not a regime claim


def test_cli_scaling_writes_json_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    root = write_sweep(tmp_path / "s", lambda p, d, a: math.log10(p) - 3)
    res = CliRunner().invoke(make_app(), ["scaling", str(root), "--boot", "50",
                                          "--contrast", "width=4,1024 depth=1"])
    assert res.exit_code == 0, res.output
    assert "compression→structure at P ≈ 1e+03" in res.output
    summary = json.loads((root / "scaling" / "scaling.json").read_text())
    assert summary["probe_sets"]["train"]["sign_changes"][0]["log10_P"] == pytest.approx(3.0)
    for name in ("scale_diagram_train.png", "delta_S_vs_params_train.png",
                 "loss_vs_params.png", "contrast_width-4-1024_depth-1.png"):
        assert (root / "scaling" / name).stat().st_size > 1000


def test_cli_scaling_without_losses_draws_every_figure_but_the_loss_one(tmp_path):
    """Cells that record no training loss (a policy's kernels, say) still get their scale
    diagram; the loss figure, which would have nothing to show, is left out."""
    pytest.importorskip("matplotlib")
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    root = write_sweep(tmp_path / "s", lambda p, d, a: math.log10(p) - 3, record_loss=False)
    res = CliRunner().invoke(make_app(), ["scaling", str(root), "--boot", "20"])
    assert res.exit_code == 0, res.output
    summary = json.loads((root / "scaling" / "scaling.json").read_text())
    assert summary["probe_sets"]["train"]["sign_changes"][0]["log10_P"] == pytest.approx(3.0)
    assert not (root / "scaling" / "loss_vs_params.png").exists()
    assert {Path(f).name for f in summary["figures"]} == {
        "scale_diagram_train.png", "delta_S_vs_params_train.png"}


def test_cli_scaling_refuses_a_directory_without_a_sweep(tmp_path):
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    res = CliRunner().invoke(make_app(), ["scaling", str(tmp_path)])
    assert res.exit_code == 2
    assert "expected a sweep directory" in res.output
