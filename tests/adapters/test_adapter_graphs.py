"""The graph family (PyTorch Geometric) against explicit per-sample autograd loops, float64."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from torch_geometric.data import Batch, Data
from torch_geometric.datasets import KarateClub
from torch_geometric.nn import GATConv, GCNConv, GINConv, global_add_pool, global_mean_pool
from torch_geometric.nn.models import GAT, GCN, GIN

import cvcore
from cvcore import plugins
from cvcore.api import build, make_request
from cvcore.errors import InputError, ModelError
from tests.tolerance import rel_error as rel


def jacobian_rows(outputs, params) -> torch.Tensor:
    """One row ``∂f_o(x_i)/∂θ`` per sample and output, by ``torch.autograd.grad``."""
    rows = []
    for out in outputs:
        out = out.reshape(-1)
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params)]))
    return torch.stack(rows)


def full_reference(outputs, params) -> np.ndarray:
    j = jacobian_rows(outputs, params)
    return (j @ j.T).numpy()


@pytest.fixture(scope="module")
def karate() -> Data:
    return KarateClub()[0]


NODE_MODELS = {"gcn": GCN, "gat": GAT, "gin": GIN}


@pytest.mark.parametrize("implementation", ["jacobian", "auto", "structured"])
@pytest.mark.parametrize("name", list(NODE_MODELS))
def test_node_level_kernel_all_nodes_and_a_subset(karate: Data, name: str,
                                                  implementation: str) -> None:
    torch.manual_seed(3)
    model = NODE_MODELS[name](in_channels=karate.num_features, hidden_channels=6, num_layers=2,
                              out_channels=3).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    x = karate.x.double()
    out = model(x, karate.edge_index)
    ref = full_reference([out[i] for i in range(karate.num_nodes)], params)
    measured = build(model, karate, request=make_request(kernel="full", dtype="float64",
                                                         implementation=implementation))
    assert (measured.family, measured.output) == ("graph", "node-level output")
    assert measured.result.kernel.shape == (34 * 3, 34 * 3)
    assert rel(measured.result.kernel, ref) < 1e-10
    nodes = torch.tensor([0, 5, 11, 33])
    sub = cvcore.ntk(model, (karate, nodes), dtype="float64", implementation=implementation)
    blocks = ref.reshape(34, 3, 34, 3)[nodes][:, :, nodes]
    traced = np.einsum("iojo->ij", blocks) / 3
    assert rel(sub, traced) < 1e-10


class DataNodeModel(torch.nn.Module):
    """A node classifier called as ``model(data)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = GCNConv(channels, 5)
        self.conv2 = GATConv(5, 2, heads=2, concat=False)

    def forward(self, data):
        h = torch.tanh(self.conv1(data.x, data.edge_index))
        return self.conv2(h, data.edge_index)


@pytest.mark.parametrize("implementation", ["jacobian", "auto"])
def test_node_level_model_taking_a_data_object(karate: Data, implementation: str) -> None:
    torch.manual_seed(4)
    model = DataNodeModel(karate.num_features).double().eval()
    params = list(model.parameters())
    graph = karate.clone()
    graph.x = graph.x.double()
    nodes = [2, 7, 30]
    out = model(graph)
    ref = full_reference([out[i] for i in nodes], params)
    k = cvcore.ntk(model, (karate, nodes), kernel="full", dtype="float64",
                   implementation=implementation)
    assert rel(k, ref) < 1e-10


def small_graphs(sizes=(3, 5, 4, 6, 2, 5)) -> list[Data]:
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for n in sizes:
        src = torch.randint(0, n, (2 * n,), generator=gen)
        dst = torch.randint(0, n, (2 * n,), generator=gen)
        graphs.append(Data(x=torch.randn(n, 4, generator=gen),
                           edge_index=torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])))
    return graphs


class GCNGraph(torch.nn.Module):
    """``forward(x, edge_index, batch)``: GCN layers, mean pooling, a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = GCNConv(4, 6), GCNConv(6, 6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x, edge_index, batch):
        h = torch.relu(self.conv1(x, edge_index))
        h = torch.relu(self.conv2(h, edge_index))
        return self.head(global_mean_pool(h, batch))


class GINGraph(torch.nn.Module):
    """``forward(x, edge_index, batch=None)``: a GIN layer and sum pooling."""

    def __init__(self) -> None:
        super().__init__()
        mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
        self.conv = GINConv(mlp, train_eps=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x, edge_index, batch=None):
        return self.head(global_add_pool(torch.tanh(self.conv(x, edge_index)), batch))


class GATGraph(torch.nn.Module):
    """``forward(data)``: a GAT layer and mean pooling over ``data.batch``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = GATConv(4, 3, heads=2)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, data):
        h = torch.nn.functional.elu(self.conv(data.x, data.edge_index))
        return self.head(global_mean_pool(h, data.batch))


def per_graph(model: torch.nn.Module, g: Data) -> torch.Tensor:
    """The model on one graph alone (the reference never sees the other graphs)."""
    x = g.x.double()
    batch = torch.zeros(g.num_nodes, dtype=torch.long)
    if isinstance(model, GATGraph):
        return model(Data(x=x, edge_index=g.edge_index, batch=batch))
    return model(x, g.edge_index, batch)


@pytest.mark.parametrize("cls", [GCNGraph, GINGraph, GATGraph], ids=["gcn", "gin", "gat"])
@pytest.mark.parametrize("packed", ["batch", "list"])
@pytest.mark.parametrize("implementation", ["jacobian", "auto"])
def test_graph_level_each_graph_a_sample(cls, packed: str, implementation: str) -> None:
    torch.manual_seed(5)
    model = cls().double().eval()
    graphs = small_graphs()
    params = list(model.parameters())
    ref = full_reference([per_graph(model, g) for g in graphs], params)
    inputs = Batch.from_data_list(graphs) if packed == "batch" else graphs
    measured = build(model, inputs, request=make_request(kernel="full", dtype="float64",
                                                         implementation=implementation))
    assert (measured.family, measured.output) == ("graph", "graph-level output")
    o = ref.shape[0] // len(graphs)
    assert measured.result.n_samples == len(graphs) and measured.result.n_outputs == o
    assert rel(measured.result.kernel, ref) < 1e-10


def test_family_named_for_a_model_without_message_passing() -> None:
    class PoolOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x, edge_index, batch):
            return global_mean_pool(torch.tanh(self.lin(x)), batch)

    torch.manual_seed(6)
    model = PoolOnly().double()
    graphs = small_graphs((3, 4, 2))
    assert plugins.select_adapter(model) is None
    ref = full_reference([per_graph(model, g) for g in graphs], list(model.parameters()))
    k = cvcore.ntk(model, graphs, kernel="full", dtype="float64", family="graph")
    assert rel(k, ref) < 1e-10


def test_graph_level_model_without_pooling_is_one_line() -> None:
    model = GCN(in_channels=4, hidden_channels=4, num_layers=1, out_channels=2)
    with pytest.raises(ModelError, match="one row per graph .*global_mean_pool"):
        cvcore.ntk(model, small_graphs(), implementation="jacobian")


def test_bad_node_indices_and_unknown_family(karate: Data) -> None:
    model = GCN(in_channels=karate.num_features, hidden_channels=4, num_layers=1, out_channels=2)
    with pytest.raises(InputError, match="node indices between 0 and 33, got 0..40"):
        cvcore.ntk(model, (karate, [0, 40]))
    with pytest.raises(InputError, match=r"expected a family among \[.*'graph'.*\], got 'graphs'"):
        cvcore.ntk(model, karate, family="graphs")
    with pytest.raises(ModelError, match="expected a model of the 'graph' family"):
        cvcore.ntk(object(), karate, family="graph")
