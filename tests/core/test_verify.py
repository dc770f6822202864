"""``verify=True`` / ``cv measure --verify``: the chosen implementation against the
Jacobian path on a few samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvcore.backends.torch import structured as torch_structured

import cvcore
from cvcore.errors import InputError
from cvcore.verify import VerificationError
from tests import torch_models as tm


@pytest.fixture
def broken_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer rule's kernel block 10 % too large."""
    gram = torch_structured.feature_gram
    monkeypatch.setattr(torch_structured, "feature_gram", lambda *a: gram(*a) * 1.1)


def test_passes_and_changes_nothing() -> None:
    model, x = tm.SmallCNN(), torch.randn(7, 1, 6, 6)
    plain = cvcore.ntk(model, x, dtype="float64")
    checked = cvcore.ntk(model, x, dtype="float64", verify=True)
    np.testing.assert_array_equal(plain, checked)


@pytest.mark.usefixtures("broken_rule")
def test_a_wrong_rule_is_named() -> None:
    model, x = tm.mlp(), torch.randn(9, 6)
    assert cvcore.ntk(model, x).shape == (9, 9)  # not checked by default
    with pytest.raises(VerificationError, match=r"0\.weight: linear \(dense\)") as info:
        cvcore.ntk(model, x, implementation="structured", verify=True)
    assert "relative difference of 0.1" in str(info.value)
    # the Jacobian path has nothing to compare with, and is right
    cvcore.ntk(model, x, implementation="jacobian", verify=True)


@pytest.mark.usefixtures("broken_rule")
def test_cli_verify_fails_in_one_line(tmp_path: Path) -> None:
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    torch.save(tm.digits_mlp(), tmp_path / "m.pt")
    args = ["measure", str(tmp_path / "m.pt"), "--data", "digits", "--samples", "12", "--json"]
    runner = CliRunner()
    assert runner.invoke(make_app(), args).exit_code == 0
    result = runner.invoke(make_app(), [*args, "--verify"])
    assert result.exit_code == 2
    assert "layer rules involved" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_verify_refuses_train() -> None:
    with pytest.raises(InputError, match="verify without train"):
        cvcore.ntk(tm.mlp(), torch.randn(3, 6), train=True, verify=True)


def test_jax_structured_is_verified() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def apply(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {"w1": jnp.asarray(np.random.default_rng(0).normal(size=(5, 7))),
              "w2": jnp.asarray(np.random.default_rng(1).normal(size=(7, 3)))}
    x = np.random.default_rng(2).normal(size=(8, 5))
    k = cvcore.ntk((apply, params), x, implementation="structured", verify=True, dtype="float64")
    assert k.shape == (8, 8)
