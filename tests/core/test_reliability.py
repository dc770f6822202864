"""Bad input, untrusted files, numerical trouble, resources and interruptions."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app

import cvcore
from cvcore import runs
from cvcore.checkpoints import load_checkpoint
from cvcore.data_io import load_data
from cvcore.errors import CVCoreError, InputError, KernelError, ModelError, ResourceError
from cvcore.protocols import LoadOptions
from tests import torch_models as tm

runner = CliRunner()


def cv(*args: object):
    return runner.invoke(make_app(), [str(a) for a in args])


# --- files through the Python API (the CLI cases are in test_cli / test_torch_checkpoints)

@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "none.pt", "no such file"),
        (lambda d: d, "directory"),
        (lambda d: write(d / "e.pt", b""), "empty"),
        (lambda d: write(d / "t.pt", b"PK\x03\x04\x14\x00truncated"), "not a torch.save archive"),
        (lambda d: write(d / "w.txt", b"hello world"), "unknown format"),
    ],
    ids=["missing", "directory", "empty", "truncated", "wrong-format"],
)
def test_checkpoint_errors_in_python(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_checkpoint(setup(tmp_path), LoadOptions())


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_truncated_torch_archive_is_a_clean_error(tmp_path: Path) -> None:
    torch.save(tm.digits_mlp(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    cut = write(tmp_path / "cut.pt", data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.pt"):
        load_checkpoint(cut, LoadOptions())
    result = cv("measure", cut, "--data", "digits")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_data_errors_in_python(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="bundled dataset"):
        load_data("cifar")
    with pytest.raises(InputError, match="empty"):
        load_data(str(write(tmp_path / "x.npy", b"")))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy"):
        load_data(str(tmp_path / "obj.npy"))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    members=st.dictionaries(
        st.sampled_from(["m/data.pkl", "m/archive_format", "m/data/0", "m/version", "x.npy",
                         "m/byteorder", "a/b/c"]),
        st.binary(max_size=64), max_size=4),
    prefix=st.binary(max_size=16),
    cut=st.integers(0, 400),
)
def test_fuzzed_archives_give_clean_errors(tmp_path: Path, members, prefix: bytes, cut: int) -> None:
    blob = zip_bytes(members)
    for i, data in enumerate([blob, blob[:cut], prefix + blob]):
        path = write(tmp_path / f"f{i}.pt", data)
        try:
            load_checkpoint(path, LoadOptions())
        except CVCoreError:
            pass
        try:
            load_data(str(path))
        except CVCoreError:
            pass


# --- data / model mismatch

def test_wrong_rank_dtype_empty_and_single_sample() -> None:
    model = tm.mlp()
    with pytest.raises(InputError, match=r"per-sample shape \(\)"):
        cvcore.ntk(model, torch.randn(6))
    with pytest.raises(InputError, match=r"torch.int64.*dtype"):
        cvcore.ntk(model, torch.randint(0, 3, (4, 6)))
    with pytest.raises(InputError, match="Long, Int"):
        cvcore.ntk(torch.nn.Embedding(10, 3), torch.randn(4))
    with pytest.raises(InputError, match="at least one input sample"):
        cvcore.ntk(model, np.zeros((0, 6), dtype=np.float32))
    one = cvcore.measure(model.double(), torch.randn(1, 6, dtype=torch.float64), dtype="float64")
    assert one.dim == 1 and one.entropy == 0.0 and one.effective_entropy == 0.0
    assert one.trace > 0


class ArgmaxOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).argmax(-1, keepdim=True)


class IntCast(ArgmaxOut):
    def forward(self, x):
        return self.fc(x).long().float()


class CountsCalls(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_non_differentiable_forwards() -> None:
    with pytest.raises(ModelError, match="floating-point output.*argmax"):
        cvcore.ntk(ArgmaxOut(), torch.randn(3, 4))
    with pytest.raises(KernelError, match="trace 0"):
        cvcore.measure(IntCast(), torch.randn(3, 4))


def test_forward_with_side_effects_on_buffers() -> None:
    model = CountsCalls().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    k = cvcore.ntk(model, x, kernel="full", dtype="float64")
    assert float(model.calls) == 0.0  # the model's own buffer is untouched
    ref = tm.reference_full(model, x).numpy()
    np.testing.assert_allclose(k, ref, rtol=1e-12, atol=1e-12)


# --- resources

def test_too_large_request_is_refused_quickly_with_options() -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(ResourceError) as info:
        cvcore.ntk(torch.nn.Linear(8, 20000), torch.randn(2000, 8), kernel="full")
    message = str(info.value)
    assert time.perf_counter() - started < 10
    assert "dimension 40000000" in message and "GiB" in message
    assert "--samples" in message and "--kernel traced" in message and "trace" in message
    result = cv("spectrum", "--help")
    assert result.exit_code == 0


def test_interrupt_keeps_rows_already_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for epoch in (1, 2, 3):
        torch.manual_seed(epoch)
        torch.save(tm.mlp(64, 8, 10), tmp_path / f"epoch_{epoch}.pt")
    real_build = runs.execute
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_build(*args, **kwargs)

    monkeypatch.setattr(runs, "execute", interrupted)
    out = tmp_path / "cv.csv"
    paths = sorted(tmp_path.glob("epoch_*.pt"))
    result = cv("measure", *paths, "--data", "digits", "--samples", "10", "--csv", out)
    assert result.exit_code == 130
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["source"]).name for r in rows] == ["epoch_1.pt"]
    assert float(rows[0]["trace"]) > 0
    monkeypatch.setattr(runs, "execute", real_build)
    resumed = cv("measure", *paths, "--data", "digits", "--samples", "10", "--csv", out,
                 "--resume", "--json")
    assert [Path(r["source"]).name for r in json.loads(resumed.stdout)] == ["epoch_2.pt", "epoch_3.pt"]
    with out.open() as fh:
        assert [Path(r["source"]).name for r in csv.DictReader(fh)] == [
            "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]


# --- numerical robustness

def test_float32_and_float64_kernels_of_one_model_agree() -> None:
    torch.manual_seed(0)
    model = tm.SmallCNN()
    x = torch.randn(12, 1, 6, 6)
    cv32 = cvcore.measure(model, x, dtype="float32")
    cv64 = cvcore.measure(model, x, dtype="float64")
    assert cv32.eigenvalues.dtype == np.float64
    assert cv32.trace == pytest.approx(cv64.trace, rel=1e-5)
    assert cv32.entropy == pytest.approx(cv64.entropy, abs=1e-4)
    assert cv32.covariance_entropy == pytest.approx(cv64.covariance_entropy, abs=1e-4)


def test_not_psd_kernel_says_by_how_much(tmp_path: Path) -> None:
    np.save(tmp_path / "k.npy", np.array([[1.0, 2.0], [2.0, 1.0]]))  # eigenvalues 3 and -1
    result = cv("spectrum", tmp_path / "k.npy")
    assert result.exit_code == 2
    assert "positive semi-definite kernel, got eigenvalue -1 (0.333 of the largest" in result.stderr


def test_zero_kernel_says_entropy_is_undefined(tmp_path: Path) -> None:
    np.save(tmp_path / "z.npy", np.zeros((3, 3)))
    result = cv("spectrum", tmp_path / "z.npy", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "trace 0" in result.stderr and "entropy is undefined" in result.stderr
