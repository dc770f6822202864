"""``[probe] dynamics = true``: a sweep's cells record the kernel's alignment with the
probe's labels and its motion between records, checked against a float64 computation from
the formulas on the cell's own untrained model (explicit per-sample autograd Jacobians)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvcore.record import RecordStore
from cvcore.sweep import ConfigError, parse_config
from cvcore.sweep.cell import _tabular_task, run_cell
from cvcore.sweep.models import build_model, initialise

TOML = """
name = "dyn"
[model]
family = "dense"
depth = 1
activation = "tanh"
[grid]
width = [6]
seed = [3]
[data]
dataset = "digits"
train = 60
test = 20
[train]
epochs = 2
batch_size = 20
lr = 0.05
init = "flax"
[probe]
train = 7
test = 5
dtype = "float64"
{extra}
[record]
every = 1
"""


def traced_kernel(model, x) -> np.ndarray:
    """Σ_p J_ip J_jp / O, from one autograd call per sample and output, in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1])[0]
        per = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            out[o], params, retain_graph=True)]).double() for o in range(out.shape[0])]
        rows.append(torch.stack(per))
    jac = torch.stack(rows)
    return (torch.einsum("iop,jop->ij", jac, jac) / jac.shape[1]).numpy()


def alignment(k: np.ndarray, labels: np.ndarray, classes: int) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    y = np.eye(classes)[labels]
    a, b = h @ k @ h, h @ y @ y.T @ h
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_dense_cell_records_alignment_with_its_labels_and_kernel_motion(tmp_path):
    cfg = parse_config(TOML.format(extra="dynamics = true\ntop_k = 3"))
    assert cfg.probe.dynamics and cfg.probe.top_k == 3
    cell = cfg.cells()[0]
    status = run_cell(cfg, cell, tmp_path)
    assert status["status"] == "done", status.get("traceback")
    params, recipe, seed = cfg.resolve(cell)
    torch.manual_seed(seed)
    task = _tabular_task(cfg, recipe)
    model = build_model(cfg.family, params, in_features=task.in_features,
                        out_features=task.out_features)
    initialise(model, recipe.init)  # as the cell does, in float32; then read in float64
    model = model.double()
    with RecordStore(tmp_path / "cells" / f"{cell.id}.db", create=False) as store:
        records = store.records(None)
    first = records[0]
    for name in ("train", "test"):
        x = task.probe[name].double()
        k = traced_kernel(model, x)
        labels = task.probe_targets[name].numpy()
        want = alignment(k, labels, task.out_features)
        assert first.get("target_alignment", name) == pytest.approx(want, rel=1e-6), name
        eig = np.sort(np.linalg.eigvalsh(k))[::-1][:3]
        np.testing.assert_allclose(first.array("top_eigenvalues", name), eig, rtol=1e-6)
    assert math.isnan(first.get("kernel_distance", "train"))  # no previous record
    later = [r.get("kernel_distance_init", "train") for r in records[1:]]
    assert len(later) == 2 and all(0 < d < 1 for d in later)  # it trained, and moved


def test_without_dynamics_a_cell_records_none_of_it(tmp_path):
    cfg = parse_config(TOML.format(extra=""))
    assert not cfg.probe.dynamics
    cell = cfg.cells()[0]
    assert run_cell(cfg, cell, tmp_path)["status"] == "done"
    with RecordStore(tmp_path / "cells" / f"{cell.id}.db", create=False) as store:
        records = store.records(None)
    assert {v.variable for r in records for v in r.values} == {"entropy", "trace"}
    assert all(not r.arrays for r in records)


@pytest.mark.parametrize("extra, message", [
    ("dynamics = 1", "[probe] dynamics"),
    ("dynamics = true\ntop_k = 0", "[probe] top_k"),
])
def test_bad_dynamics_options_are_one_line(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(TOML.format(extra=extra))
