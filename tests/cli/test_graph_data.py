"""Graphs as ``cv measure --data``: the ``.npz`` graph archive (no pickle), node level,
chosen nodes and graph level, each row against ``cvcore.measure`` on the same model and
``Data`` objects; every malformed archive a one-line error; a pickled ``Data`` refused
without advice that does not apply."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from cvcore.backends.torch.graph_data import GraphDataLoader, save_graph
from cvcore.cli.app import make_app
from torch_geometric.data import Data
from torch_geometric.datasets import KarateClub
from typer.testing import CliRunner

import cvcore
from cvcore.data_io import data_loader_for

runner = CliRunner()
FACTORIES = '''
import torch
from torch_geometric.nn import GCNConv, global_mean_pool
from torch_geometric.nn.models import GCN


def node_model():
    torch.manual_seed(0)
    return GCN(34, 6, 2, 3)


class GraphNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.conv2 = GCNConv(3, 5), GCNConv(5, 2)

    def forward(self, x, edge_index, batch):
        h = torch.tanh(self.conv1(x, edge_index))
        return global_mean_pool(self.conv2(h, edge_index), batch)


def graph_model():
    return GraphNet()
'''


def invoke(*args: str):
    return runner.invoke(make_app(), list(args))


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "gnn_models.py").write_text(FACTORIES)
    spec = importlib.util.spec_from_file_location("gnn_models", tmp_path / "gnn_models.py")
    assert spec is not None and spec.loader is not None
    ns = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ns)  # the same factories, here
    paths = {}
    for name in ("node", "graph"):
        model = getattr(ns, f"{name}_model")()
        torch.save(model.state_dict(), tmp_path / f"{name}.pt")
        paths[name] = tmp_path / f"{name}.pt"
        paths[f"{name}_model"] = model.double().eval()
    paths["factories"] = tmp_path / "gnn_models.py"
    return paths


def rows(*args: str) -> list[dict]:
    done = invoke("measure", *args, "--dtype", "float64", "--json", "--quiet")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def small_graphs(n: int = 4) -> list[Data]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        nodes = 3 + i
        out.append(Data(x=torch.randn(nodes, 3, generator=g),
                        edge_index=torch.randint(0, nodes, (2, 2 * nodes), generator=g)))
    return out


def test_node_level_all_nodes_chosen_nodes_and_samples(models, tmp_path):
    karate = KarateClub()[0]
    model = models["node_model"]
    np.savez(tmp_path / "karate.npz", x=karate.x.numpy(), edge_index=karate.edge_index.numpy())
    factory = f"{models['factories']}:node_model"
    (row,) = rows(str(models["node"]), "--model", factory, "--data", str(tmp_path / "karate.npz"))
    direct = cvcore.measure(model, karate, dtype="float64")
    assert (row["family"], row["output"], row["n_samples"]) == ("graph", "node-level output", 34)
    assert row["trace"] == pytest.approx(direct.trace, rel=1e-12)
    assert row["entropy"] == pytest.approx(direct.entropy, rel=1e-12)
    nodes = np.array([0, 2, 5, 33])
    save_graph(tmp_path / "some.npz", karate, nodes=nodes)
    (row,) = rows(str(models["node"]), "--model", factory, "--data", str(tmp_path / "some.npz"))
    some = cvcore.measure(model, (karate, torch.as_tensor(nodes)), dtype="float64")
    assert row["n_samples"] == 4 and row["trace"] == pytest.approx(some.trace, rel=1e-12)
    (row,) = rows(str(models["node"]), "--model", factory, "--data", str(tmp_path / "karate.npz"),
                  "--samples", "6", "--seed", "3")
    chosen = np.sort(np.random.default_rng(3).choice(34, size=6, replace=False))
    drawn = cvcore.measure(model, (karate, torch.as_tensor(chosen)), dtype="float64")
    assert row["entropy"] == pytest.approx(drawn.entropy, rel=1e-12)


def test_graph_level_batch_key(models, tmp_path):
    data = small_graphs()
    save_graph(tmp_path / "graphs.npz", data)
    with np.load(tmp_path / "graphs.npz") as f:
        assert sorted(f.files) == ["batch", "edge_index", "x"]
    loaded = GraphDataLoader().load(str(tmp_path / "graphs.npz"), None)
    assert len(loaded) == 4 and all(torch.equal(a.edge_index, b.edge_index)
                                    for a, b in zip(loaded, data))
    factory = f"{models['factories']}:graph_model"
    (row,) = rows(str(models["graph"]), "--model", factory, "--data",
                  str(tmp_path / "graphs.npz"))
    direct = cvcore.measure(models["graph_model"], data, dtype="float64")
    assert row["output"] == "graph-level output" and row["n_samples"] == 4
    assert row["trace"] == pytest.approx(direct.trace, rel=1e-12)
    alone = sum(cvcore.measure(models["graph_model"], [g], dtype="float64",
                               variables=["trace"]).trace for g in data)
    assert row["trace"] == pytest.approx(alone, rel=1e-10)  # graphs exchange no messages


BAD = {
    "float edges": ({"edge_index": np.array([[0.0, 1.0], [1.0, 2.0]])}, "integer dtype"),
    "edge out of range": ({"edge_index": np.array([[0, 1], [1, 3]])}, "between 0 and 2"),
    "negative edge": ({"edge_index": np.array([[0, -1], [1, 2]])}, "between 0 and 2"),
    "edges shape": ({"edge_index": np.array([[0, 1, 2]])}, r"shape \(2, edges\)"),
    "x 1-D": ({"x": np.ones(3, np.float32)}, r"shape \(nodes, features\)"),
    "x of text": ({"x": np.array([["a"], ["b"], ["c"]])}, "numeric dtype"),
    "nan features": ({"x": np.array([[np.nan], [1.0], [2.0]])}, "finite"),
    "unknown key": ({"labels": np.zeros(3)}, "optionally"),
    "weights count": ({"edge_weight": np.ones(3)}, "2 edges"),
    "batch gaps": ({"batch": np.array([0, 2, 2])}, "without gaps"),
    "batch length": ({"batch": np.array([0, 0])}, "one graph id per node"),
    "edge across graphs": ({"batch": np.array([0, 1, 1])}, "inside one graph"),
    "nodes out of range": ({"nodes": np.array([0, 3])}, "'nodes' between 0 and 2"),
    "both": ({"batch": np.array([0, 0, 0]), "nodes": np.array([0])}, "got both"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_archives_are_one_line(models, tmp_path, case):
    arrays = {"x": np.ones((3, 2), np.float32), "edge_index": np.array([[0, 1], [1, 2]])}
    change, words = BAD[case]
    arrays.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert isinstance(data_loader_for(str(path)), GraphDataLoader)
    done = invoke("measure", str(models["node"]), "--model",
                  f"{models['factories']}:node_model", "--data", str(path))
    assert done.exit_code == 2, done.output
    (line,) = [ln for ln in done.output.splitlines() if ln.strip()]
    assert line.startswith(f"error: {path}: expected")
    assert re.search(words, line), line


def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([object(), object()], dtype=object),
             edge_index=np.array([[0], [1]]))
    with pytest.raises(cvcore.errors.InputError, match="pickled; refused"):
        GraphDataLoader().load(str(path), None)


def test_pickled_data_is_refused_without_trust_advice(models, tmp_path):
    torch.save(KarateClub()[0], tmp_path / "graph.pt")
    done = invoke("measure", str(models["node"]), "--model",
                  f"{models['factories']}:node_model", "--data", str(tmp_path / "graph.pt"))
    assert done.exit_code == 2
    assert "--trust" not in done.output
    assert "never unpickled" in done.output and "x and edge_index" in done.output
    done = invoke("measure", str(models["node"]), "--model",
                  f"{models['factories']}:node_model", "--data", str(tmp_path / "graph.pt"),
                  "--trust")
    assert done.exit_code == 2 and "never unpickled" in done.output


def test_out_store_has_model_class_and_parameters(models, tmp_path):
    karate = KarateClub()[0]
    save_graph(tmp_path / "karate.npz", karate)
    done = invoke("measure", str(models["node"]), "--model", f"{models['factories']}:node_model",
                  "--data", str(tmp_path / "karate.npz"), "--out", str(tmp_path / "run.db"))
    assert done.exit_code == 0, done.output
    (run,) = cvcore.read_runs(tmp_path / "run.db")
    model = models["node_model"]
    assert run["model_class"] == f"{type(model).__module__}.{type(model).__qualname__}"
    assert run["n_params"] == sum(p.numel() for p in model.parameters())
