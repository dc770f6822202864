"""Every PyTorch checkpoint format through ``cv measure``, and the refusal of unsafe pickles."""

from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app

import cvcore
from cvcore.data_io import load_bundled
from tests import torch_models as tm

runner = CliRunner()
FACTORY = f"{Path(tm.__file__)}:digits_mlp"


def cv(*args: str):
    return runner.invoke(make_app(), [str(a) for a in args])


def rows_of(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def digits_subset(n: int, seed: int) -> np.ndarray:
    x, _ = load_bundled("digits")
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def expected_cv(model, x: np.ndarray):
    return cvcore.measure(model, x, dtype="float64")


def test_whole_pickled_module(tmp_path: Path) -> None:
    model = tm.digits_mlp()
    torch.save(model, tmp_path / "m.pt")
    (row,) = rows_of(cv("measure", tmp_path / "m.pt", "--data", "digits", "--samples", "25",
                        "--seed", "4", "--dtype", "float64", "--json"))
    ref = expected_cv(model, digits_subset(25, 4))
    assert row["backend"] == "torch" and row["n_samples"] == 25 and row["n_outputs"] == 10
    assert row["trace"] == pytest.approx(ref.trace, rel=1e-10)
    assert row["entropy"] == pytest.approx(ref.entropy, rel=1e-9)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_state_dict", "lightning"])
def test_state_dict_with_model_factory(tmp_path: Path, wrap: str) -> None:
    model = tm.digits_mlp()
    sd = model.state_dict()
    payload = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model_state_dict": {"model_state_dict": sd, "optimizer": {}},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},
    }[wrap]
    torch.save(payload, tmp_path / "sd.ckpt")
    (row,) = rows_of(cv("measure", tmp_path / "sd.ckpt", "--model", FACTORY, "--data",
                        "digits", "--samples", "10", "--dtype", "float64", "--json"))
    assert row["trace"] == pytest.approx(expected_cv(model, digits_subset(10, 0)).trace, rel=1e-10)


def test_state_dict_errors(tmp_path: Path) -> None:
    torch.save(tm.digits_mlp().state_dict(), tmp_path / "sd.pt")
    result = cv("measure", tmp_path / "sd.pt", "--data", "digits")
    assert result.exit_code == 2 and "expected --model package.module:factory" in result.stderr
    torch.save({"0.weight": torch.zeros(16, 64)}, tmp_path / "partial.pt")
    result = cv("measure", tmp_path / "partial.pt", "--model", FACTORY, "--data", "digits")
    assert result.exit_code == 2
    assert "missing keys ['0.bias', '2.bias', '2.weight']" in result.stderr


def test_safetensors_with_model(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = tm.digits_mlp()
    safetensors.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    (row,) = rows_of(cv("measure", tmp_path / "w.safetensors", "--model", FACTORY, "--data",
                        "digits", "--samples", "12", "--dtype", "float64", "--json"))
    assert row["trace"] == pytest.approx(expected_cv(model, digits_subset(12, 0)).trace, rel=1e-10)


def test_exported_program_uses_its_example_inputs(tmp_path: Path) -> None:
    model = tm.mlp()
    example = torch.randn(6, 6)
    torch.export.save(torch.export.export(model, (example,)), tmp_path / "m.pt2")
    (row,) = rows_of(cv("measure", tmp_path / "m.pt2", "--dtype", "float64", "--kernel", "full",
                        "--json"))
    ref = cvcore.measure(model, example, dtype="float64", kernel="full")
    assert row["n_samples"] == 6 and row["kernel"] == "full"
    assert row["trace"] == pytest.approx(ref.trace, rel=1e-10)


def test_data_formats(tmp_path: Path) -> None:
    model = tm.digits_mlp()
    torch.save(model, tmp_path / "m.pt")
    x = digits_subset(9, 1)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", inputs=x, labels=np.arange(9))
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    ref = expected_cv(model, x).trace
    for spec, extra in [("x.npy", []), ("x.npz", ["--key", "inputs"]), ("x.pt", [])]:
        (row,) = rows_of(cv("measure", tmp_path / "m.pt", "--data", tmp_path / spec, *extra,
                            "--dtype", "float64", "--json"))
        assert row["trace"] == pytest.approx(ref, rel=1e-10), spec


def test_time_series_natural_order_and_one_probe_set(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    models = {}
    for epoch in (10, 2, 1):
        torch.manual_seed(epoch)
        models[epoch] = tm.mlp(64, 8, 10)
        torch.save(models[epoch], run / f"epoch_{epoch}.pt")
    out = tmp_path / "series.csv"
    rows = rows_of(cv("measure", *sorted(run.glob("epoch_*.pt")), "--data", "digits",
                      "--samples", "30", "--seed", "7", "--dtype", "float64", "--json",
                      "--csv", out))
    assert [Path(r["source"]).name for r in rows] == ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt"]
    probe = digits_subset(30, 7)
    for r, epoch in zip(rows, (1, 2, 10)):
        assert r["entropy"] == pytest.approx(expected_cv(models[epoch], probe).entropy, rel=1e-9)
    with out.open() as fh:
        table = list(csv.DictReader(fh))
    assert [Path(t["source"]).name for t in table] == ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt"]
    # --resume skips what is already in the table (same settings: the dtype too).
    again = cv("measure", *sorted(run.glob("epoch_*.pt")), "--data", "digits", "--samples", "30",
               "--seed", "7", "--dtype", "float64", "--csv", out, "--resume", "--json")
    assert json.loads(again.stdout) == []
    with out.open() as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    torch.save(tm.mlp(), tmp_path / "m.pt")  # expects 6 features; digits has 64
    out = tmp_path / "o.csv"
    result = cv("measure", tmp_path / "m.pt", "--data", "digits", "--samples", "5", "--csv", out)
    assert result.exit_code == 2
    assert "per-sample shape (64,)" in result.stderr and "6x12" in result.stderr
    assert not out.exists()


class Payload:
    """Unpickling this would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (builtins.exec, (f"open({self.target!r}, 'w').close()",))


def test_untrusted_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    torch.save({"weights": torch.zeros(2), "evil": Payload(str(target))}, tmp_path / "evil.pt")
    result = cv("measure", tmp_path / "evil.pt", "--data", "digits")
    assert result.exit_code == 2
    assert "builtins.exec" in result.stderr and "--trust" in result.stderr
    assert "nothing was run" in result.stderr
    assert not target.exists()
    # Also as probe data, where --trust is not even offered.
    torch.save(tm.digits_mlp(), tmp_path / "m.pt")
    result = cv("measure", tmp_path / "m.pt", "--data", tmp_path / "evil.pt")
    assert result.exit_code == 2 and not target.exists()


class WithFunction(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 3)
        self.act = torch.tanh  # pickled as a reference to a function, not a module class

    def forward(self, x):
        return self.act(self.fc(x))


def test_trust_loads_a_file_you_made(tmp_path: Path) -> None:
    model = WithFunction()
    torch.save(model, tmp_path / "fn.pt")
    refused = cv("measure", tmp_path / "fn.pt", "--data", "digits", "--samples", "5")
    assert refused.exit_code == 2 and "builtins.getattr" in refused.stderr
    (row,) = rows_of(cv("measure", tmp_path / "fn.pt", "--trust", "--data", "digits",
                        "--samples", "5", "--dtype", "float64", "--json"))
    assert row["trace"] == pytest.approx(expected_cv(model, digits_subset(5, 0)).trace, rel=1e-10)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"not a checkpoint", "unknown format"),
     (b"PK\x03\x04garbage", "unknown format")],
    ids=["empty", "text", "truncated-zip"],
)
def test_bad_checkpoint_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    result = cv("measure", path, "--data", "digits")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "bad.bin" in result.stderr


def test_bad_data_arguments(tmp_path: Path) -> None:
    torch.save(tm.digits_mlp(), tmp_path / "m.pt")
    result = cv("measure", tmp_path / "m.pt", "--data", "mnist")
    assert result.exit_code == 2 and "bundled dataset among ['digits', 'iris']" in result.stderr
    result = cv("measure", tmp_path / "m.pt", "--data", "digits", "--samples", "5000")
    assert result.exit_code == 2 and "between 1 and 1797" in result.stderr
    result = cv("measure", tmp_path / "m.pt")
    assert result.exit_code == 2 and "expected --data" in result.stderr
