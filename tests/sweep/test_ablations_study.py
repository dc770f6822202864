"""docs/families.md's "The open checks" against the stored results it quotes: each table
is the one ``examples/sweeps/ablations/summarise.py`` makes from
``docs/figures/ablations/summary.json``; that summary agrees with each study's
``scaling.json`` (written by ``cv scaling``); cells run with the same recipe in different
studies (and in the stored digits reproduction) gave the same entropies; the matched
families' parameter counts agree with counts by hand."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures" / "ablations"
PAGE = ROOT / "docs" / "families.md"


def _summarise():
    spec = importlib.util.spec_from_file_location(
        "ablations_summarise", ROOT / "examples" / "sweeps" / "ablations" / "summarise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary() -> dict:
    path = FIGURES / "summary.json"
    if not path.is_file():
        pytest.skip("no stored ablation study")
    return json.loads(path.read_text())


def _section() -> str:
    page = PAGE.read_text()
    assert "## The open checks" in page
    return page[page.index("## The open checks"):]


def _points(name: str, probe: str = "train") -> list[dict]:
    return json.loads((FIGURES / name / "scaling.json").read_text())["probe_sets"][probe]["points"]


def test_the_page_holds_each_table_as_made_from_the_stored_summary(summary):
    s, page = _summarise(), _section()
    for probe in ("train",):
        assert s.pivot(summary, s.optimizer_columns(), probe) in page, "optimizer pivot"
        assert s.changes_table(summary, probe, s.OPTIMIZERS) in page, "optimizer changes"
        assert s.changes_table(summary, probe, tuple(s.ABLATIONS)) in page, "ablation changes"
        for name in s.ABLATIONS:
            if name in summary:
                assert s.pivot(summary, s.ablation_columns(summary, name), probe) in page, name
    for name, one in summary.items():
        assert s.table(one, "train") in page, f"{name}: table differs from summary.json"
    assert s.times_table(summary) in page


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
                per_seed = [e - s for e, s in zip(theirs["S_end"]["per_seed"],
                                                  theirs["S_start"]["per_seed"], strict=True)]
                assert p["delta_S"] == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-12)
                assert p["seeds"] == len(per_seed)
        assert one["done"] == one["cells"], f"{name}: {one['done']} of {one['cells']} cells"


def _by_point(points: list[dict], **fixed) -> dict:
    out = {}
    for p in points:
        if all(p["params"].get(k) == v for k, v in fixed.items()):
            out[(p["params"]["width"], p["params"]["depth"])] = p
    return out


def test_the_same_recipe_gives_the_same_entropies_in_every_study(summary):
    """Adam, lr 1e-3, batch 100, constant, Flax init: the opt-adam grid, the init study's
    flax column, the batch study's 100 column and the schedule study's constant column are
    the same cells (seeds 0, 1 of the depth-3 grid), and opt-adam is the relu, depth 1 and
    3 part of the stored digits reproduction."""
    if "opt-adam" not in summary:
        pytest.skip("opt-adam not stored")
    adam = _by_point(_points("opt-adam"))
    compared = 0
    for name, axis, value in (("init", "init", "flax"), ("batch", "batch_size", 100),
                              ("schedule", "schedule", "constant")):
        if name not in summary:
            continue
        for key, p in _by_point(_points(name), **{axis: value}).items():
            q = adam[key]
            for field in ("S_start", "S_end"):
                assert p[field]["per_seed"] == pytest.approx(
                    q[field]["per_seed"][:len(p[field]["per_seed"])], abs=1e-5), (name, key)
            compared += 1
    digits = ROOT / "docs" / "figures" / "digits" / "scaling.json"
    if digits.is_file():
        stored = _by_point(json.loads(digits.read_text())["probe_sets"]["train"]["points"],
                           activation="relu")
        for key, q in adam.items():
            for field in ("S_start", "S_end"):
                assert q[field]["per_seed"] == pytest.approx(
                    stored[key][field]["per_seed"], abs=1e-5), ("digits", key)
            compared += 1
    assert compared >= 9


def test_the_matched_cells_repeat_the_family_studies(summary):
    """The matched transformer and SSM share widths 8 and 32 (transformer) and 8 (SSM) at
    depth 1 with the family studies of docs/figures/families, with the same recipe: the
    seeds both ran must give the same entropies."""
    compared = 0
    for family in ("transformer", "ssm"):
        name = f"matched-{family}"
        stored = ROOT / "docs" / "figures" / "families" / family / "scaling.json"
        if name not in summary or not stored.is_file():
            continue
        theirs = _by_point(json.loads(stored.read_text())["probe_sets"]["train"]["points"])
        for key, p in _by_point(_points(name)).items():
            if key not in theirs:
                continue
            for field in ("S_start", "S_end"):
                q = theirs[key][field]["per_seed"]
                assert p[field]["per_seed"][:len(q)] == pytest.approx(q, abs=1e-5), (name, key)
            compared += 1
    if "matched-transformer" in summary:
        assert compared >= 2


def _dense_params(width: int, depth: int) -> int:
    sizes = [64] + [width] * depth + [10]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def test_parameter_counts_by_hand(summary):
    for name in summary:
        if name.startswith("matched-"):
            continue
        for p in _points(name):
            assert p["n_params"] == _dense_params(p["params"]["width"], p["params"]["depth"])
    # the matched families: each level within 25 % of the transformer's count
    matched = {n: sorted(p["n_params"] for p in _points(n))
               for n in ("matched-vit", "matched-transformer", "matched-ssm") if n in summary}
    if "matched-transformer" in matched:
        for other in set(matched) - {"matched-transformer"}:
            for a, b in zip(matched[other], matched["matched-transformer"], strict=True):
                assert 0.75 < a / b < 1.25, (other, a, b)
