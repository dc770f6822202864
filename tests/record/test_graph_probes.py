"""Graph networks in the Recorder: node-level probes (a ``Data`` graph, ``(Data, nodes)``),
graph-level probes (a list of ``Data``, a ``Batch``), named sets, subsets and classes,
each record against ``cvcore.measure`` on the same model and inputs and, for one record,
against a per-node ``torch.autograd.grad`` loop in float64."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from torch_geometric.data import Batch, Data
from torch_geometric.datasets import KarateClub
from torch_geometric.nn import GCNConv, global_mean_pool
from torch_geometric.nn.models import GCN

import cvcore
from cvcore.errors import InputError
from cvcore.record.probes import ProbeSets

VARS = ["trace", "entropy"]


@pytest.fixture(scope="module")
def karate() -> Data:
    return KarateClub()[0]


def node_model(graph: Data) -> torch.nn.Module:
    torch.manual_seed(0)
    return GCN(graph.num_features, 6, 2, 3).double().eval()


class GraphNet(torch.nn.Module):
    """A graph classifier: two GCN layers, mean pooling per graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.conv2 = GCNConv(3, 5), GCNConv(5, 2)

    def forward(self, x, edge_index, batch):
        h = torch.tanh(self.conv1(x, edge_index))
        return global_mean_pool(self.conv2(h, edge_index), batch)


def graphs(n: int = 5) -> list[Data]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        nodes = 4 + i
        edges = torch.randint(0, nodes, (2, 2 * nodes), generator=g)
        out.append(Data(x=torch.randn(nodes, 3, generator=g, dtype=torch.float64),
                        edge_index=edges))
    return out


def traced_autograd(model, graph: Data, nodes) -> float:
    """Tr of the traced kernel on ``nodes``: Σ_i (1/O) Σ_o |∂f_o(node i)/∂θ|², by autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(graph.x.double(), graph.edge_index)
    total = 0.0
    for i in nodes:
        for o in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, o], params, retain_graph=True, allow_unused=True)
            total += sum(float((g ** 2).sum()) for g in grads if g is not None)
    return total / out.shape[1]


def values(rec: cvcore.Recorder, step: int = 0) -> dict[tuple, float]:
    record = next(r for r in rec.records() if r.step == step)
    return {(v.probe_set, v.subset, v.label, v.variable): v.value for v in record.values}


def test_node_level_graph_and_nodes_against_measure_and_autograd(karate):
    model = node_model(karate)
    nodes = torch.tensor([0, 3, 5, 11, 20, 33])
    with cvcore.Recorder(ProbeSets(train=karate, test=(karate, nodes)), variables=VARS,
                         dtype="float64") as rec:
        rec.record(0, model)
        got = values(rec)
        assert rec.store.run(rec.run_id).probe_sets["train"]["n_samples"] == 34
        assert rec.store.run(rec.run_id).probe_sets["test"]["n_samples"] == 6
    whole = cvcore.measure(model, karate, variables=VARS, dtype="float64")
    some = cvcore.measure(model, (karate, nodes), variables=VARS, dtype="float64")
    assert got[("train", None, None, "trace")] == pytest.approx(whole.trace, rel=1e-12)
    assert got[("train", None, None, "entropy")] == pytest.approx(whole.entropy, rel=1e-12)
    assert got[("test", None, None, "trace")] == pytest.approx(some.trace, rel=1e-12)
    assert got[("test", None, None, "entropy")] == pytest.approx(some.entropy, rel=1e-12)
    assert got[("test", None, None, "trace")] == pytest.approx(
        traced_autograd(model, karate, nodes.tolist()), rel=1e-9)


def test_node_subsets_and_classes_are_the_chosen_nodes(karate):
    model = node_model(karate)
    rec = cvcore.Recorder(karate, subsets=(3, 8), seed=4, variables=VARS, dtype="float64")
    rec.record(0, model)
    got = values(rec)
    for part in rec.parts:
        direct = cvcore.measure(model, (karate, torch.as_tensor(part.index)), variables=VARS,
                                dtype="float64")
        assert got[("probe", part.subset, None, "trace")] == pytest.approx(direct.trace,
                                                                          rel=1e-12)
    mean = np.mean([got[("probe", i, None, "entropy")] for i in range(3)])
    assert got[("probe", None, None, "entropy")] == pytest.approx(mean, rel=1e-12)
    labels = karate.y.numpy()
    by_class = cvcore.Recorder(karate, labels=labels, variables=["trace"], dtype="float64")
    by_class.record(0, model)
    got = values(by_class)
    for c in np.unique(labels):
        nodes = torch.as_tensor(np.flatnonzero(labels == c))
        assert got[("probe", None, str(c), "trace")] == pytest.approx(
            traced_autograd(model, karate, nodes.tolist()), rel=1e-9)


def test_graph_level_list_and_batch_during_training():
    data = graphs()
    model = GraphNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cvcore.Recorder({"train": data, "test": Batch.from_data_list(data[:3])},
                          subsets=(2, 3), variables=VARS, dtype="float64")
    for step in range(3):
        rec.record(step, model)
        batch = Batch.from_data_list(data)
        loss = model(batch.x, batch.edge_index, batch.batch).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    rec.record(3, model)
    got = values(rec, 3)
    for part in rec.parts:
        chosen = [data[int(i)] for i in part.index]
        direct = cvcore.measure(model, chosen, variables=VARS, dtype="float64")
        assert got[(part.probe_set, part.subset, None, "trace")] == pytest.approx(
            direct.trace, rel=1e-12)
        alone = sum(cvcore.measure(model, [g], variables=["trace"], dtype="float64").trace
                    for g in chosen)  # each graph measured alone: the trace adds up
        assert direct.trace == pytest.approx(alone, rel=1e-10)
    assert [r.step for r in rec.records()] == [0, 1, 2, 3]
    assert len({r.get("trace", "train") for r in rec.records()}) == 4  # the weights moved


def test_bad_graph_probes_are_one_line(karate):
    with pytest.raises(InputError, match="node indices between 0 and 33"):
        cvcore.Recorder((karate, torch.tensor([0, 40])))
    with pytest.raises(InputError, match="at most 34"):
        cvcore.Recorder(karate, subsets=(2, 35))
