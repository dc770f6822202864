"""`cv report`: uncertainties only where the run holds something to measure them by
(subsets: paired standard error or a bootstrap), plain words where it does not, and the
kernel's alignment and motion; every number checked against a hand computation from the
stored values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cvcore.record import RecordStore
from cvcore.record.summary import bootstrap, paired
from tests.cli.test_report_support import invoke, per_subset_table, plain_run, subset_run


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """Deterministic checkpoints: one kernel per record, no subsets (cv measure --out)."""
    path = tmp_path / "ck.db"
    with RecordStore(path) as store:
        plain_run(store, "ckpts", {"entropy": [1.1316, 1.9854, 2.4948, 2.6504],
                                   "trace": [1251.8, 10634.2, 32652.8, 37214.6]})
    return path


def test_deterministic_run_has_no_uncertainty_and_says_so(checkpoints: Path) -> None:
    result = invoke("report", checkpoints, "--json")
    assert result.exit_code == 0, result.output
    group = json.loads(result.stdout)[0]["probe_sets"][0]
    ent, tr = group["variables"]["entropy"], group["variables"]["trace"]
    assert ent["change"] == pytest.approx(2.6504 - 1.1316)
    assert ent["change_se"] is None and ent["uncertainty"] is None  # no scatter-based se
    assert tr["growth_factor"] == pytest.approx(37214.6 / 1251.8)
    assert tr["growth_factor_se"] is None
    assert group["regime"] == "undetermined" and group["regime_sigmas"] is None
    table = invoke("report", checkpoints).stdout
    assert "undetermined: rose, no uncertainty to judge it by" in table
    rows = [line for line in table.splitlines() if line.startswith("│ probe")]
    assert len(rows) >= 2 and not any("±" in line for line in rows)
    assert "1.5188 " in rows[0]
    assert " se)" not in table  # no "452.6 se" from the step-to-step scatter
    assert "uncertainty none: no subsets recorded" in table


def test_three_records_without_subsets_get_no_error(tmp_path: Path) -> None:
    path = tmp_path / "three.db"
    with RecordStore(path) as store:
        plain_run(store, "three", {"entropy": [1.0, 1.5, 1.2]})
    ent = json.loads(invoke("report", path, "--json").stdout)[0]["probe_sets"][0]
    assert ent["variables"]["entropy"]["change_se"] is None and ent["regime"] == "undetermined"


@pytest.fixture
def subsets(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    tables = {"entropy": per_subset_table(rng, 6, 8, 1.0, 1.3, 0.2),
              "trace": np.exp(per_subset_table(rng, 6, 8, 4.0, 6.0, 0.1))}
    path = tmp_path / "sub.db"
    with RecordStore(path) as store:
        subset_run(store, "sub", tables, loss=[2.0, 1.5, 1.0, 0.7, 0.5, 0.4])
    return path, tables


def test_subsets_give_the_paired_standard_error(subsets) -> None:
    path, tables = subsets
    group = json.loads(invoke("report", path, "--json").stdout)[0]["probe_sets"][0]
    ent = group["variables"]["entropy"]
    s, e = tables["entropy"][0], tables["entropy"][-1]
    k = s.size
    # by hand: the subsets are the same samples at both ends, so the differences pair up
    assert ent["change"] == pytest.approx(e.mean() - s.mean(), rel=1e-12)
    assert ent["change_se"] == pytest.approx(np.std(e - s, ddof=1) / math.sqrt(k), rel=1e-12)
    assert ent["start_se"] == pytest.approx(np.std(s, ddof=1) / math.sqrt(k), rel=1e-12)
    assert ent["uncertainty"] == "8 subsets, paired"
    # the pairing removes the subsets' persistent offsets: far below the unpaired error
    unpaired = math.hypot(np.std(s, ddof=1), np.std(e, ddof=1)) / math.sqrt(k)
    assert ent["change_se"] < 0.5 * unpaired
    sig = abs(ent["change"]) / ent["change_se"]
    assert group["regime_sigmas"] == pytest.approx(sig)
    assert group["regime"] == ("structure formation" if sig > 2 else "within noise")
    tr = group["variables"]["trace"]
    ts, te = tables["trace"][0], tables["trace"][-1]
    log_se = np.std(te / te.mean() - ts / ts.mean(), ddof=1) / math.sqrt(k)  # delta method
    assert tr["log_change_se"] == pytest.approx(log_se, rel=1e-12)
    assert tr["growth_factor_se"] == pytest.approx(te.mean() / ts.mean() * log_se, rel=1e-12)
    table = invoke("report", path).stdout
    assert f"± {tr['growth_factor_se']:.6g}" in table and "8 subsets, paired" in table


def test_bootstrap_matches_a_direct_numpy_bootstrap(subsets) -> None:
    path, tables = subsets
    result = invoke("report", path, "--json", "--boot", "400", "--seed", "11")
    assert result.exit_code == 0, result.output
    ent = json.loads(result.stdout)[0]["probe_sets"][0]["variables"]["entropy"]
    s, e = tables["entropy"][0], tables["entropy"][-1]
    rng = np.random.default_rng(11)
    changes = []
    for _ in range(400):  # one resample at a time, not the module's vectorised draw
        pick = rng.integers(0, s.size, size=s.size)
        changes.append(e[pick].mean() - s[pick].mean())
    assert ent["change_se"] == pytest.approx(np.std(changes, ddof=1), rel=1e-12)
    assert ent["uncertainty"] == "bootstrap over 8 subsets (400 resamples, seed 11)"
    # same seed, same numbers; the bootstrap and the paired formula agree to sampling error
    again = json.loads(invoke("report", path, "--json", "--boot", "400", "--seed",
                              "11").stdout)[0]["probe_sets"][0]["variables"]["entropy"]
    assert again["change_se"] == ent["change_se"]


def test_bootstrap_and_delta_method_agree_on_many_subsets() -> None:
    rng = np.random.default_rng(0)
    s = rng.lognormal(3.0, 0.2, size=200)
    e = s * rng.lognormal(1.0, 0.1, size=200)
    delta, boot = paired(s, e), bootstrap(s, e, 4000, seed=1)
    assert boot["change_se"] == pytest.approx(delta["change_se"], rel=0.08)
    assert boot["log_se"] == pytest.approx(delta["log_se"], rel=0.08)


def test_negative_boot_is_refused(subsets) -> None:
    result = invoke("report", subsets[0], "--boot", "-1")
    assert result.exit_code == 2 and "expected --boot a non-negative integer, got -1" in \
        result.stderr


def test_report_gives_alignment_and_kernel_motion(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tables = {"entropy": per_subset_table(rng, 5, 4, 1.0, 2.0, 0.05)}
    steps = [0, 10, 20, 40, 50]
    align = [0.11, 0.25, 0.42, 0.55, 0.58]
    dist = [0.0, 0.12, 0.05, 0.09, 0.01]
    dist_init = [0.0, 0.12, 0.15, 0.22, 0.23]
    velocity = [math.nan, 0.012, 0.005, 0.0045, 0.001]
    path = tmp_path / "dyn.db"
    with RecordStore(path) as store:
        subset_run(store, "dyn", tables, steps=steps,
                   scalars={"target_alignment": align, "kernel_distance": dist,
                            "kernel_distance_init": dist_init, "kernel_velocity": velocity})
    group = json.loads(invoke("report", path, "--json").stdout)[0]["probe_sets"][0]
    dyn = group["dynamics"]
    assert (dyn["alignment_start"], dyn["alignment_end"]) == (0.11, 0.58)
    assert dyn["distance_total"] == 0.23
    assert (dyn["fastest_step"], dyn["fastest_velocity"]) == (10, 0.012)
    assert group["variables"]["target_alignment"]["change"] == pytest.approx(0.47)
    assert group["variables"]["target_alignment"]["uncertainty"] is None  # one value each
    table = invoke("report", path).stdout
    assert "target alignment 0.11 → 0.58" in table
    assert "kernel distance from the start 0.23" in table
    assert "fastest motion at step 10 (0.012 per step)" in table


def test_runs_without_dynamics_say_nothing_of_it(checkpoints: Path) -> None:
    group = json.loads(invoke("report", checkpoints, "--json").stdout)[0]["probe_sets"][0]
    assert set(group["dynamics"].values()) == {None}
    assert "target alignment" not in invoke("report", checkpoints).stdout


@pytest.mark.slow  # about 14 s when run alone, nearly all of it importing frameworks
def test_report_and_plot_of_a_recorder_run_with_dynamics(tmp_path: Path) -> None:
    """A real Recorder run (targets and dynamics): the report's alignment, distance and
    fastest step are the stored values, and the figure's heat map is the stored spectra."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    import cvcore

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=24)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    db = tmp_path / "run.db"
    with cvcore.Recorder(x, sink=db, variables=["entropy", "trace"], targets=y,
                         dynamics=True, top_k=4) as rec:
        for step in range(4):
            rec.record(step * 2, model, loss=1.0 / (step + 1))
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                                  torch.from_numpy(y)).backward()
                opt.step()
    with RecordStore(db, create=False) as store:
        records = store.records()
    group = json.loads(invoke("report", db, "--json").stdout)[0]["probe_sets"][0]
    dyn = group["dynamics"]
    assert dyn["alignment_start"] == records[0].get("target_alignment")
    assert dyn["alignment_end"] == records[-1].get("target_alignment")
    assert dyn["distance_total"] == records[-1].get("kernel_distance_init")
    velocity = [r.get("kernel_velocity") for r in records[1:]]
    assert dyn["fastest_step"] == records[1 + int(np.argmax(velocity))].step
    assert dyn["fastest_velocity"] == max(velocity)
    out = tmp_path / "fig.png"
    result = invoke("plot", db, "--out", out)
    assert result.exit_code == 0, result.output
    from cvcore.record.plotting import PlotRun, _spectrum

    with RecordStore(db, create=False) as store:
        info = store.runs()[0]
    found = _spectrum([PlotRun("r", info, records)])
    assert found is not None
    np.testing.assert_array_equal(found[3], np.stack([r.array("top_eigenvalues")
                                                      for r in records]))
