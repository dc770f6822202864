"""TensorBoard scalars from the Recorder (``tensorboard=``) in a plain PyTorch loop: the
event file, parsed with tensorboardX's own protobuf, holds every record's values at its
step, equal to the record store's and to a direct ``cvcore.measure``."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import cvcore

torch = pytest.importorskip("torch")
tbx = pytest.importorskip("tensorboardX")

from tensorboardX.proto import event_pb2

from tests.integration_cli import report_and_plot

PROBE = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)


def scalars(logdir):
    """{tag: {step: value}} from the TFRecord event files (length, crc, data, crc)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def train(rec=None, epochs=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(16, 4)).astype(np.float32))
    y = torch.from_numpy(g.normal(size=(16, 2)).astype(np.float32))
    loss = None
    for epoch in range(epochs + 1):
        if rec is not None:
            rec.record(epoch, model, loss=loss)
        if epoch < epochs:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    return model


def test_plain_loop_scalars(tmp_path):
    with cvcore.Recorder({"train": PROBE, "test": PROBE[:5]}, sink=tmp_path / "r.db",
                         tensorboard=tmp_path / "tb", variables=["entropy", "trace"]) as rec:
        model = train(rec)
    plain = train()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    got = scalars(tmp_path / "tb")
    assert set(got) == {"cv/train/entropy", "cv/train/trace", "cv/test/entropy",
                        "cv/test/trace", "cv/loss"}
    assert sorted(got["cv/train/trace"]) == [0, 1, 2, 3] and sorted(got["cv/loss"]) == [1, 2, 3]
    (run,) = cvcore.read_runs(tmp_path / "r.db")
    stored = {(r["step"], v["probe_set"], v["variable"]): v["value"]
              for r in run["records"] for v in r["values"]}
    for (step, probe_set, var), value in stored.items():
        assert got[f"cv/{probe_set}/{var}"][step] == pytest.approx(value, rel=1e-6)
    direct = cvcore.measure(model, PROBE[:5], variables=["trace"])
    assert got["cv/test/trace"][3] == pytest.approx(direct.trace, rel=1e-6)
    report_and_plot(tmp_path / "r.db", tmp_path)


def test_bad_log_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(cvcore.errors.InputError, match="expected tensorboard= a directory"):
        cvcore.Recorder(PROBE, tensorboard=tmp_path / "file")
    with pytest.raises(cvcore.errors.InputError, match="log directory path"):
        cvcore.Recorder(PROBE, tensorboard=3)


def test_missing_library_is_the_install_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)  # import fails
    with pytest.raises(cvcore.errors.MissingFrameworkError) as err:
        cvcore.Recorder(PROBE, tensorboard="tb")
    assert str(err.value) == ("tensorboardX is required for this but is not installed; "
                              "install it with: pip install tensorboardX")


def test_graph_network_scalars_and_the_final_model(tmp_path):
    """A GCN on the Karate Club graph in a plain loop, every=2: node-level probes (every
    node, and a few), the final model by ``record_final``, scalars equal to the store's
    and to ``cvcore.measure`` on the final weights."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn.models import GCN

    from cvcore.integrations.recording import record_final

    graph = KarateClub()[0]
    nodes = torch.tensor([1, 2, 8, 30])
    torch.manual_seed(0)
    model = GCN(graph.num_features, 8, 2, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with cvcore.Recorder({"train": graph, "test": (graph, nodes)}, every=2,
                         sink=tmp_path / "g.db", tensorboard=tmp_path / "tb",
                         variables=["entropy", "trace"]) as rec:
        loss = None
        for step in range(3):
            rec.record(step, model, loss=loss)
            opt.zero_grad()
            out = model(graph.x, graph.edge_index)
            loss = torch.nn.functional.cross_entropy(out, graph.y)
            loss.backward()
            opt.step()
        record_final(rec, 3, model, loss=loss)
    got = scalars(tmp_path / "tb")
    assert sorted(got["cv/train/trace"]) == [0, 2, 3]
    for name, inputs in (("train", graph), ("test", (graph, nodes))):
        direct = cvcore.measure(model, inputs, variables=["entropy", "trace"])
        assert got[f"cv/{name}/trace"][3] == pytest.approx(direct.trace, rel=1e-6)
        assert got[f"cv/{name}/entropy"][3] == pytest.approx(direct.entropy, rel=1e-6)
    assert got["cv/loss"][3] == pytest.approx(float(loss.detach()), rel=1e-6)
    (run,) = cvcore.read_runs(tmp_path / "g.db")
    assert run["probe_sets"]["test"]["n_samples"] == 4
