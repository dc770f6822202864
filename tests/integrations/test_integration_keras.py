"""The Keras callback on every Keras backend: TensorFlow in-process, JAX and torch in
subprocesses with KERAS_BACKEND set (both at once). Each runs a real short ``fit`` with and
without the callback and compares with a direct ``cvcore.measure`` on the final weights."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

keras = pytest.importorskip("keras")

from tests.integration_cli import report_and_plot
from tests.keras_integration_run import run

SCRIPT = Path(__file__).parents[1] / "keras_integration_run.py"


def check(result: dict) -> None:
    assert result["same_weights"], result["backend"]
    assert result["steps"] == [0, 1, 2, 3]
    assert result["losses"][0] is None and all(v is not None for v in result["losses"][1:])
    for var in ("entropy", "trace"):
        assert result["final"][var] == pytest.approx(result["direct"][var], rel=1e-12)
    assert len(result["history"]) == 3 and result["history"] == result["csv"]
    assert result["history"][-1] == pytest.approx(result["direct"]["trace"], rel=1e-6)
    assert result["batch_steps"] == [0, 3, 6, 8]  # 8: the final model, whatever every= says
    sparse = result["every2"]
    assert sparse["steps"] == [0, 2, 3]  # every second epoch, and the final model
    assert sparse["epochs"] == [0, 1, 2] and len(sparse["history"]) == 3
    assert math.isnan(sparse["history"][0])  # epoch 0 ends at step 1: not recorded
    assert sparse["history"][1:] == pytest.approx(sparse["stored"][1:], rel=1e-6)
    assert [e for e, _ in sparse["csv"]] == [0, 1, 2]
    assert math.isnan(sparse["csv"][0][1])
    assert [v for _, v in sparse["csv"][1:]] == pytest.approx(sparse["stored"][1:], rel=1e-6)
    assert sparse["stored"][-1] == pytest.approx(sparse["direct"], rel=1e-12)


@pytest.mark.slow
def test_other_backends_in_subprocesses(tmp_path):
    wanted = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
    if not wanted:
        pytest.skip("neither jax nor torch is installed")
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
    running = {b: subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**env, "KERAS_BACKEND": b}) for b in wanted}
    for b, p in running.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["backend"] == b
        assert result["framework"] == f"keras/{b}"  # the engine Keras runs on
        check(result)
        report_and_plot(tmp_path / b / "run.db", tmp_path)


def test_tensorflow_backend_in_process(tmp_path):
    if keras.backend.backend() != "tensorflow":  # pragma: no cover - KERAS_BACKEND set outside
        pytest.skip("runs Keras on the tensorflow backend in-process")
    result = run(str(tmp_path))
    check(result)
    assert result["framework"] == "keras/tensorflow"
    report_and_plot(tmp_path / "tensorflow" / "run.db", tmp_path)


def test_graph_probe_is_refused_at_construction():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    from cvcore.errors import InputError
    from cvcore.integrations.keras import RecorderCallback

    graph = Data(x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(InputError, match="Keras models are not graph networks"):
        RecorderCallback({"train": graph})
