"""docs/families.md against the stored results it quotes: each study's table is the one
``examples/sweeps/families/summarise.py`` makes from ``docs/figures/families/summary.json``,
that summary agrees with each study's ``scaling.json`` (written by ``cv scaling``), and
every study spans at least two orders of magnitude of parameter count."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures" / "families"
PAGE = ROOT / "docs" / "families.md"


def _summarise():
    spec = importlib.util.spec_from_file_location(
        "summarise", ROOT / "examples" / "sweeps" / "families" / "summarise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary() -> dict:
    path = FIGURES / "summary.json"
    if not path.is_file():
        pytest.skip("no stored family study")
    return json.loads(path.read_text())


#: The tables the page shows (every probe set's are in summary.json).
PAGE_TABLES = {"vit": ("train",), "transformer": ("train", "test"), "ssm": ("train", "test"),
               "gnn": ("train", "test"), "gnn-graphs": ("train",),
               "autoencoder": ("train", "latent_train"), "vae": ("train", "latent_train"),
               "rl": ("actor", "critic")}


def test_the_page_holds_each_table_as_made_from_the_stored_summary(summary):
    page = PAGE.read_text()
    make = _summarise().table
    for name, one in summary.items():
        for probe in PAGE_TABLES[name]:
            assert make(one, probe) in page, f"{name} {probe}: table differs from summary.json"


def test_the_summary_agrees_with_cv_scalings_output(summary):
    for name, one in summary.items():
        analysis = json.loads((FIGURES / name / "scaling.json").read_text())["probe_sets"]
        assert set(analysis) == set(one["probe_sets"])
        for probe, result in analysis.items():
            mine = one["probe_sets"][probe]
            assert len(mine["sign_changes"]) == len(result["sign_changes"])
            by_params = {json.dumps(p["params"], sort_keys=True): p for p in result["points"]}
            for p in mine["points"]:
                theirs = by_params[json.dumps(p["params"], sort_keys=True)]
                assert p["delta_S"] == theirs["delta_S"]["mean"]
                # ΔS is the mean over seeds of S(end) − S(start)
                per_seed = [e - s for e, s in zip(theirs["S_end"]["per_seed"],
                                                  theirs["S_start"]["per_seed"], strict=True)]
                assert p["delta_S"] == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-12)


def test_every_study_spans_two_orders_of_magnitude_of_parameters(summary):
    for name, one in summary.items():
        counts = [p["n_params"] for p in next(iter(one["probe_sets"].values()))["points"]]
        assert math.log10(max(counts) / min(counts)) >= 2, name
        assert one["done"] == one["cells"], f"{name}: {one['done']} of {one['cells']} cells"


def test_the_page_quotes_the_measured_wall_and_cpu_time(summary):
    assert _summarise().times_table(summary) in PAGE.read_text()
    for one in summary.values():  # the estimate is within a factor of 2.5 of the measure
        assert 1 / 2.5 < one["cpu_seconds"] / one["estimated_cpu_seconds"] < 2.5
