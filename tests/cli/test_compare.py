"""`cv compare`: each run's change with its uncertainty, runs that differ only in their seed
pooled, and the differences from the first group with theirs, against hand computations
from the stored values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cvcore.record import RecordStore
from cvcore.record.compare import group_runs, load_runs
from tests.cli.test_report_support import invoke, per_subset_table, plain_run, subset_run


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[list[Path], dict[tuple[int, int], dict[str, np.ndarray]]]:
    """width 16 with seeds 0, 1, 2 (two files) and width 64 with seed 0 (a third file)."""
    rng = np.random.default_rng(3)
    tables: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    paths = [tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"]
    plan = [(paths[0], 16, 0), (paths[0], 16, 1), (paths[1], 16, 2), (paths[2], 64, 0)]
    for path, width, seed in plan:
        rise = 0.5 if width == 16 else 0.9
        t = {"entropy": per_subset_table(rng, 4, 6, 1.0, 1.0 + rise, 0.1),
             "trace": np.exp(per_subset_table(rng, 4, 6, 3.0, 5.0, 0.05))}
        tables[(width, seed)] = t
        with RecordStore(path) as store:
            subset_run(store, f"w{width} s{seed}", t, tags={"width": width, "seed": seed})
    return paths, tables


def change(t: dict[str, np.ndarray], var: str = "entropy") -> float:
    return float(t[var][-1].mean() - t[var][0].mean())


def paired_se(t: dict[str, np.ndarray], var: str = "entropy") -> float:
    d = t[var][-1] - t[var][0]
    return float(np.std(d, ddof=1) / math.sqrt(d.size))


def test_seeds_are_pooled_and_differences_have_errors(sweep) -> None:
    paths, tables = sweep
    result = invoke("compare", *paths, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    narrow, wide = out["groups"]
    assert narrow["label"] == "width=16 (3 seeds)" and wide["label"] == "width=64"
    assert [r["seed"] for r in narrow["runs"]] == [0, 1, 2]
    seeds = np.asarray([change(tables[(16, s)]) for s in (0, 1, 2)])
    ent = narrow["changes"]["train"]["entropy"]["change"]
    assert ent["value"] == pytest.approx(seeds.mean(), rel=1e-12)
    assert ent["se"] == pytest.approx(seeds.std(ddof=1) / math.sqrt(3), rel=1e-12)
    assert ent["uncertainty"] == "3 seeds" and ent["per_seed"] == pytest.approx(seeds)
    one = wide["changes"]["train"]["entropy"]
    assert one["change"]["value"] == pytest.approx(change(tables[(64, 0)]), rel=1e-12)
    assert one["change"]["se"] == pytest.approx(paired_se(tables[(64, 0)]), rel=1e-12)
    diff = one["difference"]["change"]
    assert diff["value"] == pytest.approx(change(tables[(64, 0)]) - seeds.mean(), rel=1e-12)
    se = math.hypot(seeds.std(ddof=1) / math.sqrt(3), paired_se(tables[(64, 0)]))
    assert diff["se"] == pytest.approx(se, rel=1e-12)
    assert diff["sigmas"] == pytest.approx(abs(diff["value"]) / se, rel=1e-12)
    assert diff["verdict"] == ("different" if abs(diff["value"]) > 2 * se else "within noise")
    # the trace's growth: Δ ln Tr per seed, pooled the same way
    logs = np.asarray([math.log(tables[(16, s)]["trace"][-1].mean()
                                / tables[(16, s)]["trace"][0].mean()) for s in (0, 1, 2)])
    lc = narrow["changes"]["train"]["trace"]["log_change"]
    assert lc["value"] == pytest.approx(logs.mean(), rel=1e-12)
    assert lc["se"] == pytest.approx(logs.std(ddof=1) / math.sqrt(3), rel=1e-12)
    table = invoke("compare", *paths).stdout
    assert "width=16 (3 seeds)" in table and "reference" in table
    assert f"{diff['value']:.6g} ± {diff['se']:.6g}" in table
    assert "a subsets-only error leaves out the seed-to-seed spread" in table


def test_runs_with_the_same_seed_are_not_pooled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "rep.db"
    with RecordStore(path) as store:
        for name in ("first", "again"):
            subset_run(store, name, {"entropy": per_subset_table(rng, 3, 4, 1.0, 2.0, 0.1)},
                       tags={"seed": 7})
    groups = group_runs(load_runs([path]))
    assert [len(g.runs) for g in groups] == [1, 1]
    assert [g.label for g in groups] == ["first", "again"]


def test_a_difference_without_uncertainty_has_none(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    with RecordStore(path) as store:
        plain_run(store, "a", {"entropy": [1.0, 1.4]}, n=8)
        plain_run(store, "b", {"entropy": [1.0, 1.9]}, n=16)
    out = json.loads(invoke("compare", path, "--json").stdout)
    b = out["groups"][1]["changes"]["probe"]["entropy"]
    assert b["difference"]["change"]["value"] == pytest.approx(0.5)
    assert b["difference"]["change"]["se"] is None
    assert b["difference"]["change"]["verdict"] == "no uncertainty"
    assert out["probe_sizes_differ"] is True
    table = invoke("compare", path).stdout
    assert "probe sizes differ" in table and "uncertainty none" in table


def test_compare_refuses_stores_without_records(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    RecordStore(path).close()
    result = invoke("compare", path)
    assert result.exit_code == 2
    assert "expected runs with records to compare, got none" in result.stderr
