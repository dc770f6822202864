"""The ``cv`` command line: spectrum, backends, output formats and error handling."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.rows import CSV_COLUMNS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(make_app(), list(args))


@pytest.fixture
def kernels(tmp_path: Path) -> dict[str, Path]:
    np.save(tmp_path / "eye.npy", np.eye(4))
    np.savez(tmp_path / "two.npz", a=np.array([[2.0, 1.0], [1.0, 2.0]]), b=np.eye(3))
    return {"eye": tmp_path / "eye.npy", "two": tmp_path / "two.npz"}


def test_spectrum_json_has_every_field(kernels: dict[str, Path]) -> None:
    result = invoke("spectrum", str(kernels["eye"]), str(kernels["two"]), "--key", "a", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["source"] for r in rows] == [str(kernels["eye"]), str(kernels["two"])]
    expected = {"trace", "normalized_trace", "entropy", "effective_entropy", "effective_rank",
                "self_entropy", "magnitude_variance", "covariance_entropy", "eigenvalues",
                "source", "backend", "kernel", "n_samples", "n_outputs", "dtype", "seconds"}
    assert expected <= set(rows[0])
    assert rows[0]["entropy"] == pytest.approx(math.log(4))
    hand = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert rows[1]["entropy"] == pytest.approx(hand)
    assert rows[1]["eigenvalues"] == pytest.approx([3.0, 1.0])


def test_spectrum_table_and_csv(kernels: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cv.csv"
    result = invoke("spectrum", str(kernels["eye"]), "--csv", str(out))
    assert result.exit_code == 0
    assert "entropy" in result.stdout and "1.38629" in result.stdout
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS
    assert float(rows[0]["effective_rank"]) == pytest.approx(4.0)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.npy", "missing.npy: expected an existing file"),
        (lambda d: d, "expected a file, got a directory"),
        (lambda d: write(d / "empty.npy", b""), "expected a non-empty file, got an empty one"),
        (lambda d: write(d / "bad.npy", b"hello"), "expected a kernel"),
        (lambda d: (np.save(d / "ns.npy", np.ones((2, 3))), d / "ns.npy")[1], "square"),
    ],
    ids=["missing", "directory", "empty", "wrong-format", "non-square"],
)
def test_spectrum_errors_are_one_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    out = tmp_path / "out.csv"
    result = invoke("spectrum", str(path), "--csv", str(out))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_npz_without_key_lists_the_arrays(kernels: dict[str, Path]) -> None:
    result = invoke("spectrum", str(kernels["two"]))
    assert result.exit_code == 2
    assert "expected --key naming one of the arrays ['a', 'b'], got none" in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = invoke("--debug", "spectrum", str(tmp_path / "missing.npy"))
    assert result.exit_code != 0
    assert result.exception is not None and "missing.npy" in str(result.exception)


def test_backends_lists_plugins_and_install_hints() -> None:
    result = invoke("backends")
    assert result.exit_code == 0
    assert "torch" in result.stdout and "bundled" in result.stdout


def test_real_cv_subprocess_json_is_clean(kernels: dict[str, Path]) -> None:
    cv = Path(sys.executable).with_name("cv")
    done = subprocess.run([str(cv), "spectrum", str(kernels["eye"]), "--json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)[0]["effective_rank"] == pytest.approx(4.0)
    module = subprocess.run([sys.executable, "-m", "cvcore", "spectrum", str(kernels["eye"]),
                             "--json"], capture_output=True, text=True, check=True)
    assert json.loads(module.stdout)[0]["trace"] == pytest.approx(4.0)
    bad = subprocess.run([str(cv), "spectrum", "nowhere.npy"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("error: nowhere.npy: expected an existing file, got no such "
                                  "file or directory")


def test_spectrum_kernel_label_is_checked(kernels: dict[str, Path]) -> None:
    result = invoke("spectrum", str(kernels["eye"]), "--kernel", "diagonal")
    assert result.exit_code == 2
    assert "expected --kernel traced or full, got 'diagonal'" in result.stderr
    full = invoke("spectrum", str(kernels["eye"]), "--kernel", "full", "--outputs", "2", "--json")
    (row,) = json.loads(full.stdout)
    assert (row["kernel"], row["n_samples"], row["n_outputs"]) == ("full", 2, 2)
