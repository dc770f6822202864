"""cv sweep's recipe axes: optimizers, learning-rate schedules, initialisations, weight
decay and batch size, each against a hand computation; and the cost model's estimate
against measured cell times."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvcore.sweep import budget, parse_config, run_sweep
from cvcore.sweep.config import TrainSpec
from cvcore.sweep.models import initialise
from cvcore.sweep.train import lr_factor, optimizer, scheduler

TINY = """
name = "recipe"
[model]
family = "dense"
depth = 1
width = 5
activation = "tanh"
[grid]
seed = [0]
[data]
dataset = "digits"
train = 120
test = 40
[train]
epochs = 2
batch_size = 40
lr = 0.01
[probe]
train = 8
test = 8
[record]
every = 1
"""


def _one_step(spec: TrainSpec, steps: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Weights of a 3 → 1 linear model after ``steps`` full-batch steps (float64), and the
    same steps done by hand from the optimizer's definition."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1, bias=False).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    w = layer.weight.detach().numpy().copy().ravel()
    xn, yn = x.numpy(), y.numpy().ravel()
    opt = optimizer(layer, spec)
    for _ in range(steps):
        opt.zero_grad()
        torch.mean((layer(x) - y) ** 2).backward()
        opt.step()
    # by hand
    v = np.zeros(3)
    for _ in range(steps):
        g = 2 * xn.T @ (xn @ w - yn) / len(yn)
        if spec.optimizer == "adamw":
            raise AssertionError("not by hand here")
        g = g + spec.weight_decay * w
        momentum = spec.momentum or (0.9 if spec.optimizer == "sgd_momentum" else 0.0)
        v = momentum * v + g if np.any(v) or momentum == 0 else g
        w = w - spec.lr * v
    return layer.weight.detach().numpy().ravel(), w


@pytest.mark.parametrize("spec", [
    TrainSpec(optimizer="sgd", lr=0.1),
    TrainSpec(optimizer="sgd", lr=0.1, weight_decay=0.5),
    TrainSpec(optimizer="sgd_momentum", lr=0.1),
    TrainSpec(optimizer="sgd_momentum", lr=0.1, momentum=0.5, weight_decay=0.1),
])
def test_sgd_and_momentum_against_the_update_by_hand(spec):
    got, want = _one_step(spec, steps=3)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_adam_and_adamw_first_step_and_decoupled_decay():
    # Adam's first step moves every weight by lr·sign(g) (bias-corrected m/sqrt(v) = ±1);
    # AdamW additionally shrinks the weight by lr·wd·w before it
    torch.manual_seed(0)
    for name, wd in (("adam", 0.0), ("adamw", 0.3)):
        layer = torch.nn.Linear(3, 1, bias=False).double()
        w0 = layer.weight.detach().numpy().copy().ravel()
        x = torch.randn(6, 3, dtype=torch.float64)
        opt = optimizer(layer, TrainSpec(optimizer=name, lr=0.01, weight_decay=wd))
        loss = (layer(x) ** 2).mean()
        g = torch.autograd.grad(loss, layer.weight, retain_graph=True)[0].numpy().ravel()
        loss.backward()
        opt.step()
        want = w0 * (1 - 0.01 * wd) - 0.01 * np.sign(g) * np.abs(g) / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(layer.weight.detach().numpy().ravel(), want, rtol=1e-9)
        assert type(opt).__name__ == {"adam": "Adam", "adamw": "AdamW"}[name]


def test_schedules_by_hand():
    assert lr_factor("constant", 7, 10, 0.1) == 1.0
    assert lr_factor("cosine", 0, 10, 0.1) == 1.0
    assert lr_factor("cosine", 5, 10, 0.1) == pytest.approx(0.5, abs=1e-15)
    assert lr_factor("cosine", 10, 10, 0.1) == pytest.approx(0.0, abs=1e-15)
    # warm-up over round(0.3 * 10) = 3 steps: 1/3, 2/3, 1, 1, ...
    assert [lr_factor("warmup", s, 10, 0.3) for s in range(5)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    layer = torch.nn.Linear(2, 1)
    spec = TrainSpec(optimizer="sgd", lr=0.2, schedule="cosine")
    opt = optimizer(layer, spec)
    sched = scheduler(opt, spec, 4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert scheduler(opt, TrainSpec(), 4) is None


@pytest.mark.parametrize(("scheme", "variance"), [
    ("xavier", 2 / (400 + 3000)), ("kaiming", 2 / 400), ("flax", 1 / 400)])
def test_initialisations_have_their_variance_and_zero_bias(scheme, variance):
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 3000)
    initialise(torch.nn.Sequential(layer), scheme)
    assert float(layer.weight.detach().var()) == pytest.approx(variance, rel=0.02)
    assert float(layer.bias.detach().abs().max()) == 0.0


def test_orthogonal_initialisation_is_orthogonal():
    torch.manual_seed(0)
    layer = torch.nn.Linear(30, 20)
    initialise(layer, "orthogonal")
    w = layer.weight.detach().double().numpy()
    np.testing.assert_allclose(w @ w.T, np.eye(20), atol=1e-5)


def test_the_recipe_axes_are_grid_axes_and_change_the_numbers(tmp_path):
    text = TINY.replace("seed = [0]", 'seed = [0]\noptimizer = ["adam", "adamw", "sgd", '
                        '"sgd_momentum"]\nschedule = ["constant", "cosine", "warmup"]\n'
                        'init = ["flax", "xavier"]\nweight_decay = [0.0, 0.01]\n'
                        'batch_size = [40, 120]').replace("lr = 0.01", "lr = 0.01\nwarmup = 0.5")
    cfg = parse_config(text)
    assert cfg.cell_count() == 4 * 3 * 2 * 2 * 2
    picked = [c for c in cfg.cells() if c.params["batch_size"] == 40
              and c.params["weight_decay"] == 0.01 and c.params["init"] == "xavier"]
    _, recipe, _ = cfg.resolve(picked[0])
    assert (recipe.optimizer, recipe.schedule, recipe.weight_decay) == ("adam", "constant", 0.01)
    finals = set()
    from cvcore.sweep.cell import run_cell
    for cell in picked[:6]:  # adam × 3 schedules, adamw × 3 schedules
        status = run_cell(cfg, cell, tmp_path)
        assert status["status"] == "done", status.get("traceback")
        finals.add(status["final"]["train_loss"])
    assert len(finals) == 6  # every recipe trained differently


@pytest.mark.slow
def test_the_estimate_against_measured_cell_times(tmp_path):
    """The cost model's CPU seconds within a factor of 2.5 of the measured CPU time
    (``time.process_time`` of the cell, one thread) of cells large enough for the
    arithmetic to count: dense 64-W-W-10 on 1000 digits, W = 1024 and 2048."""
    text = TINY.replace("width = 5\n", "").replace("depth = 1", "depth = 2").replace(
        "seed = [0]", "seed = [0]\nwidth = [1024, 2048]").replace(
        "train = 120\ntest = 40", "train = 1000\ntest = 200").replace(
        "epochs = 2", "epochs = 4").replace("batch_size = 40", "batch_size = 100").replace(
        "train = 8\ntest = 8", "train = 100\ntest = 100").replace("every = 1", "every = 2")
    cfg = parse_config(text)
    run_sweep(cfg, tmp_path / "s", workers=1, progress=None)
    shape = budget.check_data(cfg)
    for cell in cfg.cells():
        status = json.loads((tmp_path / "s" / "cells" / f"{cell.id}.json").read_text())
        assert status["status"] == "done", status.get("traceback")
        estimate = budget.cell_seconds(cfg, cell, shape)
        assert 1 / 2.5 < status["cpu_seconds"] / estimate < 2.5, (cell.id, status, estimate)
