"""cv sweep: the config's checks, the models and data, one cell against an independent
kernel, determinism, restarts, failures, and sweeps on local processes and on Dask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.record import RecordStore
from cvcore.sweep import ConfigError, load_config, parse_config, run_sweep
from cvcore.sweep.cell import run_cell
from cvcore.sweep.config import DataSpec
from cvcore.sweep.data import load_split
from cvcore.sweep.models import TRUNCATED_STD, build_model, initialise

TINY = """
name = "tiny"
[model]
family = "dense"
depth = 1
activation = "tanh"
[grid]
width = [3, 8]
seed = [0, 1]
[data]
dataset = "digits"
train = 120
test = 40
[train]
epochs = 2
batch_size = 40
lr = 0.01
init = "flax"
[probe]
train = 12
test = 10
[record]
every = 1
"""


def write(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the config ------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ('optimiser = "adam"\n', "optimiser: expected one of the top-level keys"),
    ('[train]\noptimizer = "lbfgs"\n', "[train] optimizer: expected one of adam, adamw, sgd, sgd_momentum, got 'lbfgs'"),
    ('[train]\nschedule = "step"\n', "[train] schedule: expected one of constant, cosine, warmup, got 'step'"),
    ('[train]\nwarmup = 2\n', "[train] warmup: expected a fraction of the training steps in [0, 1], got 2"),
    ('[train]\nepoch = 3\n', "[train] epoch: expected one of the keys of [train]"),
    ('[train]\nlr = -1\n', "[train] lr: expected a positive number, got -1"),
    ('[train]\nloss = "hinge"\n', "[train] loss: expected one of cross_entropy, mse"),
    ('[train]\ninit = "he"\n', "[train] init: expected one of default, flax, xavier, kaiming, orthogonal"),
    ('[probe]\nsubsets = [3]\n', "[probe] subsets: expected [K, n], two positive integers"),
    ('[probe]\nvariables = ["entropie"]\n', "[probe] variables: expected variables among"),
    ('[record]\nevery = 0\n', "[record] every: expected a positive integer, got 0"),
    ('[data]\ndataset = "mnist"\n', "[data] dataset: expected one of digits, iris, diabetes"),
])
def test_a_wrong_key_or_value_is_one_line_naming_it(change, message):
    base = '[model]\nfamily = "dense"\nwidth = 4\ndepth = 1\n'
    text = change + base if not change.startswith("[") else base + change
    with pytest.raises(ConfigError) as info:
        parse_config(text, where="c.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    ('[model]\nfamily = "mlp"\n', "[model] family: expected one of dense, conv, vit, transformer, ssm, gnn, autoencoder, vae, rl or a factory"),
    ('[model]\nfamily = "dense"\ndepth = 1\n', "[model] width: expected a positive integer"),
    ('[model]\nfamily = "dense"\ncolour = 1\n', "[model] colour: expected a parameter of the dense"),
    ('[model]\nfamily = "dense"\ndepth = 1\n[grid]\nwidth = 4\n', "[grid] width: expected a non-empty list"),
    ('[model]\nfamily = "dense"\ndepth = 1\n[grid]\nwidth = [4, 4]\n', "[grid] width: expected distinct"),
    ('[model]\nfamily = "dense"\ndepth = 1\nwidth = 2\n[grid]\nactivation = ["relu6"]\n',
     "activation: expected one of relu, tanh"),
    ('[model]\nfamily = "dense"\ndepth = 1\nwidth = 2\n[grid]\nseed = [-1]\n',
     "[grid] seed: expected non-negative integers"),
    ('[model]\nfamily = "dense"\ndepth = 1\nwidth = 2\n[grid]\nlr = [0.1, "x"]\n',
     "[train] lr: expected a positive number, got 'x'"),
    ('[model\n', "expected TOML"),
])
def test_model_and_grid_errors(text, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(text, where="c.toml")
    assert message in str(info.value)


def test_cli_reports_a_config_error_in_one_line(tmp_path):
    path = write(tmp_path, TINY.replace('lr = 0.01', 'lr = "fast"'))
    res = CliRunner().invoke(make_app(), ["sweep", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: {path}: [train] lr: expected a positive number, "
                                  f"got 'fast'")
    assert not (tmp_path / "o").exists()


def test_cells_and_their_resolution():
    cfg = parse_config(TINY.replace("seed = [0, 1]", "seed = [0, 1]\nlr = [0.1, 0.001]"))
    cells = cfg.cells()
    assert len(cells) == 8
    assert cells[0].id == "width=3,seed=0,lr=0.1"
    model, train, seed = cfg.resolve(cells[-1])
    assert model == {"depth": 1, "activation": "tanh", "width": 8}
    assert (train.lr, train.epochs, seed) == (0.001, 2, 1)
    assert cfg.record.schedule(7) == list(range(8))
    assert parse_config(TINY.replace("every = 1", "steps = [0, 3, 50]")).record.schedule(10) \
        == [0, 3, 10]


def test_the_example_configs_are_valid():
    root = Path(__file__).resolve().parents[2] / "examples" / "sweeps"
    counts = {p.stem: len(load_config(p).cells()) for p in root.glob("*.toml")}
    assert counts["digits"] == 108 and counts["diabetes"] == 108
    assert counts["digits-mse"] == 36 and counts["digits-default-init"] == 36


# -- models and data -------------------------------------------------------------------

def test_flax_init_is_lecun_normal_truncated_with_zero_bias():
    torch.manual_seed(0)
    layer = torch.nn.Linear(500, 4000)
    initialise(torch.nn.Sequential(layer), "flax")
    w = layer.weight.detach().numpy().ravel()
    # Flax's lecun_normal: variance 1/fan_in after truncation to ±2σ of the stretched normal
    assert w.std() == pytest.approx(math.sqrt(1 / 500), rel=0.01)
    assert np.abs(w).max() <= 2 * math.sqrt(1 / 500) / TRUNCATED_STD + 1e-7
    assert np.abs(w).max() > 1.9 * math.sqrt(1 / 500) / TRUNCATED_STD
    assert float(layer.bias.detach().abs().max()) == 0.0
    torch.manual_seed(0)
    default = torch.nn.Linear(500, 4000)
    # PyTorch's default: uniform on ±1/sqrt(fan_in), variance 1/(3 fan_in)
    assert default.weight.detach().numpy().std() == pytest.approx(math.sqrt(1 / 1500), rel=0.01)


def test_dense_and_conv_families():
    m = build_model("dense", {"width": 5, "depth": 3, "activation": "relu"}, in_features=64,
                    out_features=10)
    assert sum(p.numel() for p in m.parameters()) == (64 * 5 + 5) + 2 * (5 * 5 + 5) + 5 * 10 + 10
    assert [type(x).__name__ for x in m][:2] == ["Linear", "ReLU"]
    c = build_model("conv", {"width": 4, "depth": 2, "activation": "tanh"}, in_features=64,
                    out_features=10)
    assert c(torch.zeros(3, 64)).shape == (3, 10)
    assert sum(p.numel() for p in c.parameters()) == (9 * 4 + 4) + (4 * 9 * 4 + 4) + 4 * 10 + 10
    u = build_model("tests.sweep_factories:make", {"width": 6}, in_features=4, out_features=3)
    assert u(torch.zeros(2, 4)).shape == (2, 3)


def test_data_splits():
    digits = load_split(DataSpec(dataset="digits", train=1000))
    assert (digits.x_train.shape, digits.x_test.shape, digits.classes) == ((1000, 64), (797, 64), 10)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    diabetes = load_split(DataSpec(dataset="diabetes", train=300))
    assert diabetes.x_test.shape == (142, 10) and diabetes.classes == 0
    assert diabetes.y_train.mean() == pytest.approx(0.0, abs=1e-5)
    assert diabetes.y_train.std() == pytest.approx(1.0, abs=1e-5)
    assert load_split(DataSpec(dataset="wine", train=100)).classes == 3
    assert load_split(DataSpec(dataset="iris", train=100)).x_test.shape == (50, 4)


def test_a_users_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 3)), y=rng.integers(0, 2, 30))
    split = load_split(DataSpec(dataset=str(tmp_path / "d.npz"), train=20))
    assert (split.x_train.shape, split.classes) == ((20, 3), 2)


# -- one cell ----------------------------------------------------------------------------

def _entropy_reference(model, x):
    """Entropy of the traced NTK from explicit per-sample, per-output autograd loops."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1])[0]
        per_output = []
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], params, retain_graph=True)
            per_output.append(torch.cat([g.reshape(-1) for g in grads]).double())
        rows.append(torch.stack(per_output))
    jac = torch.stack(rows)  # N, O, P
    kernel = torch.einsum("iop,jop->ij", jac, jac).numpy() / jac.shape[1]
    lam = np.clip(np.linalg.eigvalsh(kernel), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()), float(np.trace(kernel))


def test_a_cell_records_the_kernel_of_the_model_it_trains(tmp_path):
    cfg = parse_config(TINY)
    cell = cfg.cells()[1]  # width 3, seed 1
    status = run_cell(cfg, cell, tmp_path)
    assert status["status"] == "done", status.get("traceback")
    assert status["n_params"] == 64 * 3 + 3 + 3 * 10 + 10
    with RecordStore(tmp_path / "cells" / f"{cell.id}.db", create=False) as store:
        records = store.records(None)
        assert [r.step for r in records] == [0, 1, 2]
        first = records[0]
    # rebuild the untrained model from the cell's seed and measure it independently
    torch.manual_seed(1)
    model = build_model("dense", {"width": 3, "depth": 1, "activation": "tanh"},
                        in_features=64, out_features=10)
    initialise(model, "flax")
    split = load_split(cfg.data)
    for name, x in (("train", split.x_train[:12]), ("test", split.x_test[:10])):
        entropy, trace = _entropy_reference(model, torch.from_numpy(x))
        assert first.get("entropy", name) == pytest.approx(entropy, rel=1e-4)
        assert first.get("trace", name) == pytest.approx(trace, rel=1e-4)
    # the stored loss is the training set's loss at that step
    logits = model(torch.from_numpy(split.x_train))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(split.y_train))
    assert first.loss == pytest.approx(float(loss), rel=1e-5)
    assert set(first.extras) == {"test_loss", "train_accuracy", "test_accuracy"}


def test_a_cell_is_deterministic(tmp_path):
    cfg = parse_config(TINY)
    cell = cfg.cells()[3]
    a = run_cell(cfg, cell, tmp_path / "a")
    b = run_cell(cfg, cell, tmp_path / "b")
    assert a["final"] == b["final"]
    series = []
    for root in ("a", "b"):
        with RecordStore(tmp_path / root / "cells" / f"{cell.id}.db", create=False) as s:
            series.append(s.series(None, "entropy", probe_set="test")["value"])
    np.testing.assert_array_equal(series[0], series[1])
    assert series[0][0] != series[0][-1]  # it did train


def test_a_conv_cell(tmp_path):
    cfg = parse_config(TINY.replace('family = "dense"\ndepth = 1', 'family = "conv"\ndepth = 2')
                       .replace("epochs = 2", "epochs = 1"))
    status = run_cell(cfg, cfg.cells()[0], tmp_path)
    assert status["status"] == "done", status.get("traceback")
    assert status["n_params"] == (9 * 3 + 3) + (3 * 9 * 3 + 3) + 3 * 10 + 10


def test_mse_and_regression_cells(tmp_path):
    text = TINY.replace('dataset = "digits"\ntrain = 120\ntest = 40',
                        'dataset = "diabetes"\ntrain = 100').replace('init = "flax"',
                                                                    'loss = "mse"')
    cfg = parse_config(text)
    status = run_cell(cfg, cfg.cells()[0], tmp_path)
    assert status["status"] == "done", status.get("traceback")
    assert "train_accuracy" not in status["final"]
    ce = parse_config(text.replace('loss = "mse"', 'loss = "cross_entropy"'))
    bad = run_cell(ce, ce.cells()[0], tmp_path / "ce")
    assert bad["status"] == "failed"
    assert "[train] loss: expected mse" in bad["error"]


# -- whole sweeps ----------------------------------------------------------------------

def test_sweep_and_scaling_end_to_end_with_restart_and_a_failed_cell(tmp_path):
    pytest.importorskip("matplotlib")
    text = TINY.replace('family = "dense"\ndepth = 1\nactivation = "tanh"',
                        'family = "tests.sweep_factories:make"').replace(
        "width = [3, 8]", "width = [3, 8, 13]").replace("seed = [0, 1]", "seed = [0, 1, 2]")
    path = write(tmp_path, text)
    out = tmp_path / "sweep"
    runner = CliRunner()
    res = runner.invoke(make_app(), ["sweep", str(path), "--out", str(out), "--workers", "2"])
    assert res.exit_code == 1, res.output  # one width fails, the others finish
    assert "FAILED width=13,seed=0 " in res.output
    assert "RuntimeError: width 13 is not supported by this factory" in res.output
    assert "done 6, failed 3" in res.output and "to go" in res.output
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["done"], summary["failed"], summary["ran"]) == (6, 3, 9)
    done_file = out / "cells" / "width=8,seed=2.json"
    before = done_file.stat().st_mtime_ns
    # restart: finished cells are not redone, failed ones are retried (and fail again)
    res = runner.invoke(make_app(), ["sweep", str(path), "--out", str(out), "--workers", "1"])
    assert "6 already done, 3 to run" in res.output
    assert done_file.stat().st_mtime_ns == before
    # a changed config is refused for the same directory
    res = runner.invoke(make_app(), ["sweep", str(write(tmp_path, text.replace(
        "epochs = 2", "epochs = 3"), "other.toml")), "--out", str(out)])
    assert res.exit_code == 2 and "expected the config this sweep was started with" in res.output
    res = runner.invoke(make_app(), ["scaling", str(out), "--boot", "20"])
    assert res.exit_code == 0, res.output
    analysis = json.loads((out / "scaling" / "scaling.json").read_text())["probe_sets"]
    train = analysis["train"]
    assert train["cells"]["done"] == 6 and len(train["cells"]["failed"]) == 3
    assert {p["params"]["width"] for p in train["points"]} == {3, 8}
    assert (out / "scaling" / "scale_diagram_test.png").stat().st_size > 1000


def test_sweep_on_a_dask_cluster_of_two_workers(tmp_path):
    distributed = pytest.importorskip("distributed")
    cfg = parse_config(TINY)
    lines: list[str] = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        summary = run_sweep(cfg, tmp_path / "dask", engine="dask", workers=2,
                            scheduler=cluster.scheduler_address, progress=lines.append)
        hosts = {json.loads(p.read_text())["pid"] for p in (tmp_path / "dask" / "cells").glob(
            "*.json")}
    assert (summary["done"], summary["failed"]) == (4, 0)
    assert summary["engine"] == "dask"
    assert len(lines) == 6 and "[4/4]" in lines[-2]
    assert len(hosts) == 2  # both workers ran cells
    # the same cell run here gives bitwise the same record
    cell = cfg.cells()[2]
    run_cell(cfg, cell, tmp_path / "here")
    values = []
    for root in ("dask", "here"):
        with RecordStore(tmp_path / root / "cells" / f"{cell.id}.db", create=False) as s:
            values.append(s.series(None, "entropy", probe_set="train")["value"])
    np.testing.assert_array_equal(values[0], values[1])


def test_engine_options_are_checked(tmp_path):
    cfg = parse_config(TINY)
    with pytest.raises(ConfigError, match="--scheduler only with --engine dask"):
        run_sweep(cfg, tmp_path, scheduler="tcp://x:1")
    res = CliRunner().invoke(make_app(), ["sweep", str(write(tmp_path)), "--engine", "ray"])
    assert res.exit_code == 2 and "expected --engine local or dask" in res.output
