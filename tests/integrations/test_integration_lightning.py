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



class Headless(pl.LightningModule):
    """No forward(): the network is ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_module(model, callbacks, tmp_path, epochs=3, **trainer_options):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu",
                         logger=pl.loggers.CSVLogger(tmp_path, name="csv"),
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, deterministic=True, log_every_n_steps=1,
                         **trainer_options)
    trainer.fit(model, loader())
    return trainer


def test_module_without_forward_is_refused_and_its_run_closed(tmp_path):
    cb = RecorderCallback(PROBE, sink=tmp_path / "run.db", name="headless")
    with pytest.raises(cvcore.errors.InputError, match="submodule= naming the network.*'net'"):
        fit_module(Headless(), [cb], tmp_path)
    (run,) = cvcore.read_runs(tmp_path / "run.db")
    assert run["closed"] is not None and run["records"] == []
    with pytest.raises(cvcore.errors.InputError, match="submodule= one of"):
        fit_module(Headless(), [RecorderCallback(PROBE, submodule="body")], tmp_path)


def test_named_submodule_every_two_and_the_final_model(tmp_path):
    cb = RecorderCallback(PROBE, submodule="net", every=2, variables=VARS,
                          sink=tmp_path / "run.db")
    model = Headless()
    fit_module(model, [cb], tmp_path, epochs=3)
    (run,) = cvcore.read_runs(tmp_path / "run.db")
    assert [r["step"] for r in run["records"]] == [0, 2, 3]  # 3: the final model
    assert run["model_class"].endswith("Sequential")
    direct = cvcore.measure(model.net, PROBE, variables=VARS)
    final = {v["variable"]: v["value"] for v in run["records"][-1]["values"]}
    assert final["trace"] == pytest.approx(direct.trace, rel=1e-12)
    assert final["entropy"] == pytest.approx(direct.entropy, rel=1e-12)
    cb = RecorderCallback(PROBE, submodule="net", unit="step", every=3, variables=["trace"])
    model = Headless()
    fit_module(model, [cb], tmp_path / "steps", epochs=2, max_steps=7)
    steps = [r.step for r in cb.recorder.store.records(cb.recorder.run_id)]
    assert steps == [0, 3, 6, 7]  # max_steps ends training at 7
    assert cb.recorder.store.records(cb.recorder.run_id)[-1].get("trace") == pytest.approx(
        cvcore.measure(model.net, PROBE, variables=["trace"]).trace, rel=1e-12)


def test_graph_network_node_level(tmp_path):
    pytest.importorskip("torch_geometric")
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn.models import GCN

    graph = KarateClub()[0]

    class NodeClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gcn = GCN(graph.num_features, 8, 2, 4)

        def forward(self, x, edge_index):
            return self.gcn(x, edge_index)

        def training_step(self, batch, batch_idx):
            out = self(graph.x, graph.edge_index)
            return torch.nn.functional.cross_entropy(out[graph.train_mask],
                                                     graph.y[graph.train_mask])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

        def train_dataloader(self):
            return torch.utils.data.DataLoader([0], batch_size=1)

    nodes = torch.tensor([0, 4, 9, 16, 25, 33])
    cb = RecorderCallback({"train": graph, "test": (graph, nodes)}, variables=VARS,
                          sink=tmp_path / "gcn.db")
    module = NodeClassifier()
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=3, callbacks=[cb], accelerator="cpu", logger=False,
               enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False).fit(module)
    (run,) = cvcore.read_runs(tmp_path / "gcn.db")
    assert [r["step"] for r in run["records"]] == [0, 1, 2, 3]
    final = {(v["probe_set"], v["variable"]): v["value"] for v in run["records"][-1]["values"]}
    for name, inputs in (("train", graph), ("test", (graph, nodes))):
        direct = cvcore.measure(module.gcn, inputs, variables=VARS)
        assert final[(name, "trace")] == pytest.approx(direct.trace, rel=1e-6)
        assert final[(name, "entropy")] == pytest.approx(direct.entropy, rel=1e-6)
    assert run["records"][0]["values"] != run["records"][-1]["values"]
