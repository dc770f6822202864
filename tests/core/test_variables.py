"""Asking for some variables only: the diagonal path never forms the kernel."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app

import cvcore
from cvcore.errors import InputError
from tests import torch_models as tm


def test_diagonal_variables_by_hand() -> None:
    d = cvcore.diagonal_variables([1.0, 4.0, 4.0])
    q = np.array([1.0, 2.0, 2.0]) / 5.0
    assert d.trace == 9.0 and d.normalized_trace == 3.0
    assert d.self_entropy == pytest.approx(-(q * np.log(q)).sum())
    assert d.magnitude_variance == pytest.approx(np.var(3 * q))


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_trace_only_equals_the_kernels_trace(kernel: str) -> None:
    torch.manual_seed(0)
    model = tm.SmallCNN().double()
    x = torch.randn(9, 1, 6, 6, dtype=torch.float64)
    ref = tm.reference_full(model, x)
    k = ref.numpy() if kernel == "full" else tm.traced_from_full(ref, 9).numpy()
    full = cvcore.measure(model, x, dtype="float64", kernel=kernel)
    part = cvcore.measure(model, x, dtype="float64", kernel=kernel,
                          variables=("trace", "self_entropy", "magnitude_variance"))
    assert isinstance(part, cvcore.DiagonalVariables) and part.dim == k.shape[0]
    assert part.trace == pytest.approx(np.trace(k), rel=1e-10)
    assert part.self_entropy == pytest.approx(full.self_entropy, rel=1e-10)
    assert part.magnitude_variance == pytest.approx(full.magnitude_variance, rel=1e-8)
    # A spectral variable needs the whole kernel.
    assert isinstance(cvcore.measure(model, x, dtype="float64", variables="trace,entropy"),
                      cvcore.CollectiveVariables)


def test_unknown_variable_is_refused() -> None:
    with pytest.raises(InputError, match="expected variables among"):
        cvcore.measure(tm.mlp(), torch.randn(3, 6), variables="curvature")


def test_cli_variables_trace(tmp_path) -> None:
    model = tm.digits_mlp()
    torch.save(model, tmp_path / "m.pt")
    result = CliRunner().invoke(make_app(), ["measure", str(tmp_path / "m.pt"), "--data",
                                             "digits", "--samples", "20", "--dtype", "float64",
                                             "--variables", "trace", "--json"])
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["entropy"] is None and row["eigenvalues"] is None
    from cvcore.data_io import load_bundled

    x, _ = load_bundled("digits")
    probe = x[np.sort(np.random.default_rng(0).choice(len(x), 20, replace=False))]
    assert row["trace"] == pytest.approx(float(np.trace(cvcore.ntk(model, probe, dtype="float64"))),
                                         rel=1e-10)
    assert not math.isnan(row["self_entropy"])


def test_cli_stochastic_estimate_has_error_bars(tmp_path) -> None:
    model = tm.digits_mlp()
    torch.save(model, tmp_path / "m.pt")
    args = ["measure", str(tmp_path / "m.pt"), "--data", "digits", "--samples", "120",
            "--dtype", "float64", "--json"]
    runner = CliRunner()
    exact = json.loads(runner.invoke(make_app(), args).stdout)[0]
    result = runner.invoke(make_app(), [*args, "--method", "stochastic", "--probes", "24"])
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["method"] == "stochastic" and row["entropy_stderr"] > 0
    assert row["trace"] == pytest.approx(exact["trace"], rel=1e-9)  # exact, from the diagonal
    assert abs(row["entropy"] - exact["entropy"]) < 4 * row["entropy_stderr"] + 1e-3
    bad = runner.invoke(make_app(), [*args, "--method", "magic"])
    assert bad.exit_code == 2 and "method" in bad.stderr
