"""The structured torch path never takes a size coincidence for samples (issue: GCN on
KarateClub, a 20-row buffer at N = 20, batch centering).

Every implementation, through the public API, in float64, against explicit per-sample
``torch.autograd.grad`` loops: sample i's output is computed by the model on sample i
alone (the meaning cvcore gives forwards that couple samples in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import cvcore
from tests.tolerance import rel_error

IMPLEMENTATIONS = ("auto", "structured", "jacobian")
RTOL = 1e-9


def per_sample_kernel(model: Any, one: Callable[[int], Any], n: int) -> np.ndarray:
    """Traced kernel from ``one(i)`` (sample i's output, computed alone), one
    ``autograd.grad`` per sample and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        out = one(i).reshape(-1)
        per_o = []
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            per_o.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                    for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_o))
    j = torch.stack(rows).detach().numpy()
    return np.einsum("iop,jop->ij", j, j) / j.shape[1]


rel = partial(rel_error, norm="l2", floor=1e-300)


def check_all(model: Any, inputs: Any, ref: np.ndarray) -> None:
    for impl in IMPLEMENTATIONS:
        k = cvcore.ntk(model, inputs, dtype="float64", implementation=impl)
        assert rel(k, ref) < RTOL, impl
        trace = cvcore.measure(model, inputs, dtype="float64", implementation=impl,
                               variables=["trace"]).trace
        assert trace == pytest.approx(np.trace(ref), rel=RTOL), impl


# ------------------------------------------------------------------- graph networks
pyg = pytest.importorskip("torch_geometric")


def karate() -> Any:
    from torch_geometric.datasets import KarateClub

    return KarateClub()[0]  # ships inside torch_geometric: no download


class TwoLayer(nn.Module):
    def __init__(self, kind: str, n_in: int) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv, GCNConv, GINConv

        if kind == "gcn":
            self.c1, self.c2 = GCNConv(n_in, 8), GCNConv(8, 4)
        elif kind == "gat":
            self.c1, self.c2 = GATConv(n_in, 4, heads=2), GATConv(8, 4)
        else:
            self.c1 = GINConv(nn.Sequential(nn.Linear(n_in, 8), nn.ReLU()))
            self.c2 = GINConv(nn.Linear(8, 4))

    def forward(self, x: Any, edge_index: Any) -> Any:
        return self.c2(torch.relu(self.c1(x, edge_index)), edge_index)


@pytest.mark.parametrize("nodes", ["all", "subset"])
@pytest.mark.parametrize("kind", ["gcn", "gat", "gin"])
def test_graph_networks_match_per_node_gradients(kind: str, nodes: str) -> None:
    data = karate()
    assert data.num_nodes == 34
    torch.manual_seed(1)
    model = TwoLayer(kind, data.num_features).double().eval()
    index = np.arange(34) if nodes == "all" else np.array([0, 3, 5, 11, 20, 33])
    x = data.x.double()
    ref = per_sample_kernel(model, lambda i: model(x, data.edge_index)[int(index[i])], len(index))
    inputs = data if nodes == "all" else (data, torch.as_tensor(index))
    check_all(model, inputs, ref)


# ------------------------------------------------------- tensors with the probe's size
class TableIndexed(nn.Module):
    """A layer applied to a parameter table with as many rows as the probe, indexed by it."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, 5))
        self.layer = nn.Linear(5, 3)

    def forward(self, idx: Any) -> Any:
        return torch.tanh(self.layer(torch.sin(self.table)))[idx]


class BufferMean(nn.Module):
    """``l(x) + l(B).mean(0)`` with a 20-row buffer ``B``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.register_buffer("B", torch.randn(20, 4))

    def forward(self, x: Any) -> Any:
        return self.layer(x) + self.layer(self.B).mean(0)


class Centered(nn.Module):
    """Batch centering in eval mode: ``h - h.mean(0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Any) -> Any:
        h = self.l1(x)
        return self.l2(torch.tanh(h - h.mean(0)) + h)


class BatchAttention(nn.Module):
    """Attention across the batch dimension: every sample attends to every other."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: Any) -> Any:
        w = torch.softmax(self.q(x) @ self.k(x).T / 2.0, dim=-1)
        return self.o(w @ self.v(x))


class BatchMHA(nn.Module):
    """``nn.MultiheadAttention`` over the batch: the samples are the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Any) -> Any:
        h = self.inp(x).unsqueeze(1)  # (L = N, batch 1, E)
        return self.out(self.att(h, h, h, need_weights=False)[0][:, 0])


def test_layer_on_a_table_indexed_by_the_probe() -> None:
    torch.manual_seed(2)
    model = TableIndexed(20).double().eval()
    idx = torch.randperm(20)
    check_all(model, idx, per_sample_kernel(model, lambda i: model(idx[i:i + 1]), 20))


@pytest.mark.parametrize("n", [16, 20])
def test_layer_on_a_buffer_of_the_probe_size(n: int) -> None:
    torch.manual_seed(3)
    model = BufferMean().double().eval()
    x = torch.randn(n, 4, dtype=torch.float64)
    check_all(model, x, per_sample_kernel(model, lambda i: model(x[i:i + 1]), n))


@pytest.mark.parametrize("make", [Centered, BatchAttention, BatchMHA])
def test_forwards_coupling_samples_mean_each_sample_alone(make: Any) -> None:
    torch.manual_seed(4)
    model = make().double().eval()
    x = torch.randn(12, 4, dtype=torch.float64)
    ref = per_sample_kernel(model, lambda i: model(x[i:i + 1]), 12)
    check_all(model, x, ref)
    batched = per_sample_kernel(model, lambda i: model(x)[i], 12)
    assert rel(batched, ref) > 1e-3  # the model does couple its samples


def test_row_local_layers_keep_their_rule() -> None:
    """Only the layer on the buffer leaves the structured path."""
    from cvcore.backends.torch.setup import as_inputs
    from cvcore.backends.torch.setup import prepare_model as prepare
    from cvcore.backends.torch.structured import capture_block

    from cvcore.protocols import Implementation, KernelRequest

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
            self.register_buffer("B", torch.randn(20, 4))

        def forward(self, x: Any) -> Any:
            return self.a(x) + self.b(self.B).mean(0)

    prep = prepare(Two(), torch.float64, "cpu")
    x = as_inputs(torch.randn(20, 4), torch.float64, "cpu")
    req = KernelRequest(dtype="float64", implementation=Implementation.STRUCTURED)
    block = capture_block(prep, x, req, check=True)
    assert block.structured == {"a.weight", "a.bias"}
    assert {"b.weight", "b.bias"} <= block.excluded
