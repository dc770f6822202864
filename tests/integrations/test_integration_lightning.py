"""The Lightning callback: a real short ``Trainer.fit``, the recorded steps, values equal to
a direct ``cvcore.measure`` on the final weights, the CSV logger's columns, and the same
final weights with and without the callback."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import cvcore

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from cvcore.integrations.lightning import RecorderCallback
from tests.integration_cli import report_and_plot

VARS = ["entropy", "trace"]


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(32, 4)).astype(np.float32))
    y = torch.from_numpy(g.normal(size=(32, 2)).astype(np.float32))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                       shuffle=True, generator=torch.Generator().manual_seed(1))


def fit(callbacks, tmp_path, epochs=3):
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu",
                         logger=pl.loggers.CSVLogger(tmp_path, name="csv"),
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, deterministic=True, log_every_n_steps=1)
    trainer.fit(model, loader())
    return model, trainer


def metrics(tmp_path):
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


PROBE = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)


def test_epochs_recorded_logged_and_training_unchanged(tmp_path):
    cb = RecorderCallback({"train": PROBE, "test": PROBE[:6] * 2}, sink=tmp_path / "run.db",
                          variables=VARS, loss_key="train_loss", name="pl")
    model, _ = fit([cb], tmp_path)
    plain, _ = fit([], tmp_path / "plain")
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    (run,) = cvcore.read_runs(tmp_path / "run.db")
    assert [r["step"] for r in run["records"]] == [0, 1, 2, 3]
    assert run["closed"] is not None and run["framework"] == "torch"
    direct = cvcore.measure(model, PROBE, variables=VARS)
    final = {(v["probe_set"], v["variable"]): v["value"] for v in run["records"][-1]["values"]}
    assert final[("train", "entropy")] == pytest.approx(direct.entropy, rel=1e-12)
    assert final[("train", "trace")] == pytest.approx(direct.trace, rel=1e-12)
    assert run["records"][1]["loss"] is not None
    rows = metrics(tmp_path)
    logged = [float(r["cv/train/trace"]) for r in rows if r.get("cv/train/trace")]
    assert len(logged) == 4
    assert logged[-1] == pytest.approx(direct.trace, rel=1e-6)
    report_and_plot(tmp_path / "run.db", tmp_path)


def test_steps_every_two(tmp_path):
    cb = RecorderCallback(PROBE, unit="step", every=2, variables=["trace"])
    model, _ = fit([cb], tmp_path, epochs=2)  # 4 batches per epoch: 8 optimizer steps
    steps = [r.step for r in cb.recorder.store.records(cb.recorder.run_id)]
    assert steps == [0, 2, 4, 6, 8]
    trace = cb.recorder.store.records(cb.recorder.run_id)[-1].get("trace")
    assert trace == pytest.approx(cvcore.measure(model, PROBE, variables=["trace"]).trace,
                                  rel=1e-12)
    rows = metrics(tmp_path)
    logged = {int(r["step"]): float(r["cv/probe/trace"]) for r in rows if r.get("cv/probe/trace")}
    assert sorted(logged) == steps
    assert logged[8] == pytest.approx(trace, rel=1e-6)


def test_bad_unit_is_one_line():
    with pytest.raises(cvcore.errors.InputError, match="unit= one of"):
        RecorderCallback(PROBE, unit="batch")

