"""The numpy-mlp backend: cvcore's conformance suite, a kernel derived by hand, the
checkpoint format and ``cv measure`` end to end."""

from __future__ import annotations

import ast
import doctest
import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any

import cvcore
import numpy as np
import pytest
from cvcore import plugins
from cvcore.checkpoints import load_checkpoint
from cvcore.cli.app import make_app
from cvcore.data_io import load_bundled, probe_subset
from cvcore.errors import InputError, ModelError
from cvcore.protocols import DiagonalBackend, KernelRequest, LoadOptions
from cvcore.testing import (
    CHECKS,
    FiniteDifferenceAccess,
    finite_difference_jacobian,
    kernel_from_jacobian,
    relative_error,
    run_backend_conformance,
)
from typer.testing import CliRunner

import cvcore_numpy_mlp
import cvcore_numpy_mlp.model
from cvcore_numpy_mlp import MARKER, NumpyMLP
from cvcore_numpy_mlp.backend import NumpyMLPBackend
from cvcore_numpy_mlp.loaders import NumpyMLPLoader

ACCESS = FiniteDifferenceAccess(
    get_params=lambda m: m.flat_params(),
    forward=lambda m, p, x: m.with_params(p).forward(np.asarray(x, dtype=np.float64)),
)


def inputs(n: int) -> np.ndarray:
    return np.random.default_rng(10 + n).normal(size=(n, 4))


@pytest.fixture
def registered():
    """The plugin in cvcore's registry: by its entry point when installed, inline if not."""
    manager = plugins.manager()
    inline = not manager.is_registered(cvcore_numpy_mlp)
    if inline:
        plugins.register(cvcore_numpy_mlp, name="numpy_mlp-inline")
    yield
    if inline:
        plugins.unregister(cvcore_numpy_mlp)


# --- the conformance suite ------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[4, 3], [4, 5, 2], [4, 5, 3, 3]], ids=["linear", "1-hidden", "2-hidden"])
def test_conformance(registered: None, sizes: list[int]) -> None:
    report = run_backend_conformance(
        NumpyMLPBackend(),
        make_model=lambda: NumpyMLP.random(sizes, seed=1),
        make_inputs=inputs,
        reference=ACCESS,
        foreign=(NumpyMLP.random(sizes).layers, {"W0": np.ones((3, 4))}),
        bad_inputs={
            "3 features instead of 4": np.ones((2, 3)),
            "a 1-D array": np.ones(4),
            "a NaN input": np.full((2, 4), np.nan),
            "a ragged list": [[1.0, 2.0, 3.0, 4.0], [1.0]],
            "strings": np.array([["a"] * 4]),
        },
    )
    assert report.passed == CHECKS, str(report)


# --- a kernel derived by hand -----------------------------------------------------------

W1, C, X = [0.5, -1.0], 0.1, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def one_unit(v: list[float], d: list[float]) -> NumpyMLP:
    """``f_o(x) = v_o tanh(w·x + c) + d_o``: one hidden unit, ``len(v)`` outputs."""
    return NumpyMLP(((np.array([W1]), np.array([C])),
                     (np.array(v).reshape(-1, 1), np.array(d))))


def hand_full_kernel(v: list[float]) -> np.ndarray:
    """With ``h = tanh(w·x + c)`` and ``s = 1 - h²``: ``∂f_o/∂w = v_o s x``,
    ``∂f_o/∂c = v_o s``, ``∂f_o/∂v_o' = δ_oo' h``, ``∂f_o/∂d_o' = δ_oo'``, so
    ``K_(i,o),(j,o') = v_o v_o' s_i s_j (x_i·x_j + 1) + δ_oo' (h_i h_j + 1)``."""
    h = [math.tanh(W1[0] * x[0] + W1[1] * x[1] + C) for x in X]
    s = [1 - t * t for t in h]
    o = len(v)
    k = np.zeros((len(X) * o, len(X) * o))
    for i, xi in enumerate(X):
        for j, xj in enumerate(X):
            dot = xi[0] * xj[0] + xi[1] * xj[1]
            for a in range(o):
                for b in range(o):
                    k[i * o + a, j * o + b] = (v[a] * v[b] * s[i] * s[j] * (dot + 1)
                                               + (a == b) * (h[i] * h[j] + 1))
    return k


def test_one_hidden_unit_single_output_by_hand(registered: None) -> None:
    model = one_unit([2.0], [0.3])
    k = cvcore.ntk(model, np.array(X), dtype="float64")
    expected = hand_full_kernel([2.0])
    assert k.shape == (3, 3)
    assert relative_error(k, expected) < 1e-14
    # K_00 spelled out: h = tanh(0.6), s = 1 - h², K = 4 s² · 2 + h² + 1.
    h = math.tanh(0.6)
    assert k[0, 0] == pytest.approx(8 * (1 - h * h) ** 2 + h * h + 1, rel=1e-14)


def test_one_hidden_unit_two_outputs_by_hand(registered: None) -> None:
    model = one_unit([2.0, -0.5], [0.3, 0.0])
    full = cvcore.ntk(model, np.array(X), kernel="full", dtype="float64")
    expected = hand_full_kernel([2.0, -0.5])
    assert relative_error(full, expected) < 1e-14
    traced = cvcore.ntk(model, np.array(X), dtype="float64")
    assert relative_error(traced, (expected[0::2, 0::2] + expected[1::2, 1::2]) / 2) < 1e-14


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_diagonal_by_hand_without_the_kernel(kernel: str) -> None:
    v = [2.0, -0.5]
    model, x = one_unit(v, [0.3, 0.0]), np.array(X)
    full = np.diag(hand_full_kernel(v))  # K_(i,o),(i,o), row i·O + o
    expected = full if kernel == "full" else full.reshape(3, 2).mean(axis=1)
    backend = NumpyMLPBackend()
    assert isinstance(backend, DiagonalBackend)
    diag = backend.diagonal(model, x, KernelRequest(kernel=kernel, dtype="float64"))
    assert diag.shape == expected.shape
    assert relative_error(diag, expected) < 1e-14


def test_diagonal_blocks_and_matches_the_kernel(registered: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = NumpyMLP.random([4, 5, 3], seed=4), inputs(7)
    for kernel in ("traced", "full"):
        whole = NumpyMLPBackend().ntk(model, x, KernelRequest(kernel=kernel, dtype="float64"))
        for budget in (64, KernelRequest().memory_budget):  # one sample and tensor at a time
            request = KernelRequest(kernel=kernel, dtype="float64", memory_budget=budget)
            diag = NumpyMLPBackend().diagonal(model, x, request)
            assert relative_error(diag, np.diag(whole.kernel)) < 1e-13
    # cvcore asks for the diagonal alone when only the trace is wanted: no kernel is built
    def no_kernel(*args: Any) -> None:
        raise AssertionError("expected the diagonal path, got a call to ntk")

    monkeypatch.setattr(NumpyMLPBackend, "ntk", no_kernel)
    cv = cvcore.measure(model, x, variables=("trace",), kernel="full", dtype="float64")
    assert cv.trace == pytest.approx(np.trace(whole.kernel), rel=1e-12)


def test_nan_outputs_name_the_samples() -> None:
    model = NumpyMLP.random([4, 3], seed=0)
    big = inputs(3)
    big[1] = 1e308  # finite inputs whose outputs overflow to Inf
    for run in (NumpyMLPBackend().ntk, NumpyMLPBackend().diagonal):
        with np.errstate(over="ignore", invalid="ignore"), pytest.raises(
                ModelError, match=r"NaN/Inf for 1 of 3 samples \(indices 1\)"):
            run(model, big, KernelRequest(dtype="float64"))


def test_lower_floors_never_import_the_backend() -> None:
    package = Path(cvcore_numpy_mlp.__file__).parent
    for name in ("model", "setup", "jacobian", "diagonal", "loaders"):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "cvcore_numpy_mlp.backend" not in imported, name
        assert "cvcore_numpy_mlp" not in imported, name  # nor the hooks in __init__


def test_analytic_jacobian_matches_finite_differences() -> None:
    model, x = NumpyMLP.random([4, 6, 5, 3], seed=3), inputs(5)
    analytic = model.jacobian(x, range(6))
    assert analytic.shape == (5, 3, model.n_params)
    assert relative_error(analytic, finite_difference_jacobian(ACCESS, model, x)) < 1e-8


def test_small_budget_really_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, tuple[int, ...]]] = []
    original = NumpyMLP.jacobian

    def spy(self: NumpyMLP, x: np.ndarray, members: Any) -> np.ndarray:
        seen.append((x.shape[0], tuple(members)))
        return original(self, x, members)

    monkeypatch.setattr(NumpyMLP, "jacobian", spy)
    model, x = NumpyMLP.random([4, 5, 3], seed=0), inputs(7)
    blocked = NumpyMLPBackend().ntk(model, x, KernelRequest(dtype="float64", memory_budget=64))
    assert max(n for n, _ in seen) == 1  # one sample at a time
    assert {m for _, m in seen} == {(0,), (1,), (2,), (3,)}  # one tensor at a time
    seen.clear()
    whole = NumpyMLPBackend().ntk(model, x, KernelRequest(dtype="float64"))
    assert seen == [(7, (0, 1, 2, 3))]
    assert relative_error(blocked.kernel, whole.kernel) < 1e-13


def test_requests_it_cannot_honour_are_refused() -> None:
    model, x = NumpyMLP.random([4, 3]), inputs(2)
    with pytest.raises(InputError, match="expected output=None"):
        NumpyMLPBackend().ntk(model, x, KernelRequest(output=0))
    with pytest.raises(InputError, match="expected device None or 'cpu'"):
        NumpyMLPBackend().ntk(model, x, KernelRequest(device="cuda"))
    with pytest.raises(ModelError, match="expected a cvcore_numpy_mlp.NumpyMLP"):
        NumpyMLPBackend().ntk(object(), x, KernelRequest())
    bad = NumpyMLP(((np.full((3, 4), np.nan), np.zeros(3)),))
    with pytest.raises(ModelError, match="finite weights"):
        NumpyMLPBackend().ntk(bad, x, KernelRequest())


def test_model_validates_layer_shapes() -> None:
    with pytest.raises(ModelError, match="take 5 inputs"):
        NumpyMLP(((np.ones((5, 4)), np.ones(5)), (np.ones((2, 3)), np.ones(2))))


def test_model_doctests() -> None:
    assert doctest.testmod(cvcore_numpy_mlp.model).failed == 0


# --- the checkpoint format --------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = NumpyMLP.random([4, 5, 3], seed=2)
    path = tmp_path / "model.npz"
    model.save(path)
    assert NumpyMLPLoader().sniff(path)
    loaded = NumpyMLPLoader().load(path, LoadOptions())
    assert loaded.backend == "numpy-mlp"
    assert loaded.info["sizes"] == [4, 5, 3]
    np.testing.assert_array_equal(loaded.model.flat_params(), model.flat_params())


def test_sniff_refuses_other_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", data=np.ones((3, 4)))
    np.save(tmp_path / "data.npy", np.ones(3))
    (tmp_path / "notes.npz").write_text("not a zip")
    for name in ("data.npz", "data.npy", "notes.npz", "missing.npz"):
        assert not NumpyMLPLoader().sniff(tmp_path / name)
    assert not NumpyMLPLoader().sniff(tmp_path)
    with pytest.raises(InputError, match="without the marker"):
        NumpyMLPLoader().load(tmp_path / "data.npz", LoadOptions())


@pytest.mark.parametrize("arrays, message", [
    ({MARKER: np.array(2), "W0": np.ones((2, 2)), "b0": np.ones(2)}, "format version 1"),
    ({MARKER: np.array(1), "W0": np.ones((2, 2))}, r"expected arrays \['W0', 'b0'\]"),
    ({MARKER: np.array(1), "W0": np.ones((2, 2), int), "b0": np.ones(2)}, "floating-point"),
    ({MARKER: np.array(1), "W0": np.ones((2, 2)), "b0": np.ones(3)}, "W \\(out, in\\)"),
], ids=["version", "missing-bias", "integer-weights", "bias-shape"])
def test_malformed_checkpoints_are_input_errors(tmp_path: Path, arrays: dict[str, Any],
                                                message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        NumpyMLPLoader().load(path, LoadOptions())


def test_cvcore_finds_the_loader_and_backend(registered: None, tmp_path: Path) -> None:
    assert plugins.registry().backends["numpy-mlp"].name == "numpy-mlp"
    NumpyMLP.random([4, 3]).save(tmp_path / "m.npz")
    loaded = load_checkpoint(tmp_path / "m.npz", LoadOptions())
    assert isinstance(loaded.model, NumpyMLP)
    assert plugins.select_backend(loaded.model).name == "numpy-mlp"


def test_entry_point_is_declared() -> None:
    try:
        dist = importlib.metadata.distribution("cvcore-numpy-mlp")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cvcore-numpy-mlp is not installed (pip install -e examples/numpy-backend-plugin)")
    eps = [ep for ep in dist.entry_points if ep.group == "cvcore"]
    assert [(ep.name, ep.value) for ep in eps] == [("numpy_mlp", "cvcore_numpy_mlp")]


def test_cv_measure_end_to_end(registered: None, tmp_path: Path) -> None:
    model = NumpyMLP.random([64, 16, 10], seed=0)
    path = tmp_path / "model.npz"
    model.save(path)
    result = CliRunner().invoke(make_app(), ["measure", str(path), "--data", "digits",
                                             "--samples", "30", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["backend"], row["n_samples"], row["n_outputs"]) == ("numpy-mlp", 30, 10)
    # The same 30 digits, differenced in float64: Tr K_traced = (1/O) Σ_i ‖J_i‖².
    x = probe_subset(load_bundled("digits")[0], 30, 0)
    reference = kernel_from_jacobian(finite_difference_jacobian(ACCESS, model, x), "traced")
    assert row["trace"] == pytest.approx(np.trace(reference), rel=1e-4)
