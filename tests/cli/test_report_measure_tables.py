"""The tables of `cv measure --method stochastic` and `--projections` show the error of every
estimate, the same numbers as --json carries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli.test_report_support import invoke

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 10))
    path = tmp_path_factory.mktemp("ck") / "epoch_0.pt"
    torch.save(model, path)
    return path


def rows_of(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines()
            if line.startswith("│")]


@pytest.mark.parametrize("how", [["--method", "stochastic", "--probes", "8", "--steps", "12"],
                                 ["--projections", "4"]], ids=["stochastic", "sketched"])
def test_every_estimate_has_its_error_in_the_table(checkpoint: Path, how: list[str]) -> None:
    args = ["measure", checkpoint, "--data", "digits", "--samples", "40", "--seed", "3", "-q",
            "--dtype", "float64", *how]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    table = invoke(*args).stdout
    body = rows_of(table)[0]
    s, s_se = row["entropy"], row["entropy_stderr"]
    assert s_se > 0
    assert f"{s:.6g} ± {s_se:.2g}" in body
    assert f"{row['trace']:.6g} ± {row['trace_stderr']:.2g}" in body
    # derived columns: exp(S) and S / ln D carry the entropy's error (first order)
    assert f"{row['effective_rank']:.6g} ± {math.exp(s) * s_se:.2g}" in body
    if row.get("effective_entropy") is not None:
        assert f"{row['effective_entropy']:.6g} ± {s_se / math.log(40):.2g}" in body
    if "--projections" in how:
        assert f"{row['kernel_stderr']:.6g}" in body
        assert any(c.endswith("± ?") for c in body)  # self-S, cov-S: no error known
    assert "± : the standard error of a stochastic or sketched estimate" in table


def test_exact_rows_carry_no_error(checkpoint: Path) -> None:
    table = invoke("measure", checkpoint, "--data", "digits", "--samples", "20", "-q").stdout
    assert all("±" not in c for c in rows_of(table)[0])
    assert "± :" not in table
