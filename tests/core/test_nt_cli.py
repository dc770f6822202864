"""``cv measure --against`` (cross kernels), ``--trace-axes``, ``--save-kernel``, and two
small promises of ``cv measure``: ``-q`` keeps TensorFlow's start-up lines off stderr,
``--verify`` says that it checked and passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

from tests.tolerance import rel_error

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: object):
    return CliRunner().invoke(make_app(), [str(a) for a in args])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    for name in ("a", "b"):
        model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        torch.save(model, tmp_path / f"{name}.pt")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(6, 5)))
    np.save(tmp_path / "t.npy", rng.normal(size=(4, 5)))
    return {"a": tmp_path / "a.pt", "b": tmp_path / "b.pt", "x": tmp_path / "x.npy",
            "t": tmp_path / "t.npy", "dir": tmp_path}


def reference(path: Path, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The traced cross kernel from per-sample autograd Jacobians, float64."""
    model = torch.load(path, weights_only=False).double()

    def jac(inputs: np.ndarray) -> np.ndarray:
        rows = []
        for xi in inputs:
            out = model(torch.tensor(xi)[None])[0]
            rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                out[o], list(model.parameters()), retain_graph=True)]) for o in range(2)]))
        return torch.stack(rows).detach().numpy()

    return np.einsum("iop,jop->ij", jac(x), jac(t)) / 2


def test_against_prints_a_summary_and_saves_the_kernel(files: dict[str, Path]) -> None:
    saved = files["dir"] / "k.npy"
    result = invoke("measure", files["a"], "--trust", "--data", files["x"], "--against",
                    files["t"], "--dtype", "float64", "--save-kernel", saved, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["shape"] == [6, 4] and row["n_samples"] == [6, 4] and row["n_outputs"] == 2
    assert "traced" in row["convention"]
    k = np.load(saved)
    want = reference(files["a"], np.load(files["x"]), np.load(files["t"]))
    assert rel_error(k, want) < 1e-10
    assert row["mean"] == pytest.approx(float(want.mean()), rel=1e-9)
    assert row["top_singular_value"] == pytest.approx(np.linalg.svd(want)[1][0], rel=1e-9)
    assert row["frobenius"] == pytest.approx(np.linalg.norm(want), rel=1e-9)


def test_save_kernel_never_replaces_a_file_without_force_nor_an_input(
        files: dict[str, Path]) -> None:
    """An existing file stays byte for byte unless --force; a checkpoint or a data file is
    never the kernel's path, --force or not; with --force the kernel is the reference."""
    kept = files["dir"] / "k.npy"
    kept.write_bytes(b"keep")
    common = ["measure", files["a"], "--trust", "--data", files["x"], "--against", files["t"],
              "--dtype", "float64", "--save-kernel"]
    result = invoke(*common, kept)
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert kept.read_bytes() == b"keep"
    for source in (files["a"], files["x"], files["t"]):
        before = source.read_bytes()
        result = invoke(*common, source, "--force")
        assert result.exit_code == 2 and "differ from the input" in result.stderr, source
        assert source.read_bytes() == before
    assert invoke(*common, kept, "--force").exit_code == 0
    want = reference(files["a"], np.load(files["x"]), np.load(files["t"]))
    assert rel_error(np.load(kept), want) < 1e-10


def test_several_checkpoints_save_one_npz(files: dict[str, Path]) -> None:
    saved = files["dir"] / "k.npz"
    result = invoke("measure", files["a"], files["b"], "--trust", "--data", files["x"],
                    "--against", files["t"], "--kernel", "full", "--dtype", "float64",
                    "--save-kernel", saved)
    assert result.exit_code == 0, result.output
    assert "kernel summary" in result.stdout and "12 x 8" in result.stdout
    with np.load(saved) as fh:
        assert sorted(fh.files) == ["a", "b"]
        traced = fh["b"].reshape(6, 2, 4, 2).trace(axis1=1, axis2=3) / 2
    want = reference(files["b"], np.load(files["x"]), np.load(files["t"]))
    assert rel_error(traced, want) < 1e-10


def test_trace_axes_without_against(files: dict[str, Path]) -> None:
    saved = files["dir"] / "k.npy"
    result = invoke("measure", files["a"], "--trust", "--data", files["x"], "--trace-axes", "",
                    "--diagonal-axes", "-1", "--dtype", "float64", "--save-kernel", saved, "-q")
    assert result.exit_code == 0, result.output
    k = np.load(saved)
    assert k.shape == (6, 6, 2)
    x = np.load(files["x"])
    assert rel_error(k.mean(axis=2), reference(files["a"], x, x)) < 1e-10


def test_bad_cross_options_are_one_line(files: dict[str, Path]) -> None:
    result = invoke("measure", files["a"], "--trust", "--data", files["x"], "--trace-axes",
                    "-1", "--implementation", "structured")
    assert result.exit_code == 2
    assert "expected implementation 'auto' or 'jacobian' with output axes" in result.stderr
    result = invoke("measure", files["a"], "--trust", "--data", files["x"], "--against",
                    files["t"], "--save-kernel", files["dir"] / "k.txt")
    assert result.exit_code == 2 and ".npy or .npz" in result.stderr
    result = invoke("measure", files["a"], "--trust", "--data", files["x"], "--against",
                    files["t"], "--per-layer")
    assert result.exit_code == 2 and "for the kernel alone" in result.stderr


def test_verify_says_it_passed(files: dict[str, Path]) -> None:
    result = invoke("measure", files["a"], "--trust", "--data", files["x"], "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: passed: 1 kernel matched the Jacobian path on 4 samples" in result.stderr


QUIET = textwrap.dedent("""
    import os, sys
    from cvcore.cli.measure import quiet_stderr
    with quiet_stderr(True):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1796574131.524634   31752 port.cc:153] oneDNN custom operations are on.\\n")
        os.write(2, b"To enable the following instructions: AVX2 FMA, in other operations, rebuild\\n")
        os.write(2, b"error: kept.pt: expected --data\\n")
        print("a python warning line", file=sys.stderr)
    os.write(2, b"after\\n")
""")


def test_quiet_filter_drops_only_tensorflow_start_up_lines() -> None:
    done = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["error: kept.pt: expected --data",
                                        "a python warning line", "after"]


@pytest.mark.slow
def test_quiet_silences_tensorflow_for_real(tmp_path: Path) -> None:
    """A Keras model measured with ``-q``: nothing of TensorFlow's start-up on stderr
    (without ``-q`` its oneDNN line is there, so the check can fail)."""
    pytest.importorskip("keras")
    script = textwrap.dedent(f"""
        import numpy as np, keras
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.save({str(tmp_path / "m.keras")!r})
        np.save({str(tmp_path / "x.npy")!r}, np.ones((4, 3), dtype="float32"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    cv = [sys.executable, "-m", "cvcore", "measure", str(tmp_path / "m.keras"), "--data",
          str(tmp_path / "x.npy")]
    loud = subprocess.run(cv, capture_output=True, text=True, timeout=300, env=env, check=False)
    quiet = subprocess.run([*cv, "-q"], capture_output=True, text=True, timeout=300, env=env,
                           check=False)
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert "oneDNN" in loud.stderr or "absl" in loud.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    assert "entropy" in quiet.stdout
