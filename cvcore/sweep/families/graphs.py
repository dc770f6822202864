"""The ``gnn`` family: GCN or GIN layers (``conv``), written on dense adjacency matrices
(PyTorch only; no graph library needed to train).

**karate** (node classification): Zachary's karate club as networkx ships it (34 members,
78 friendships; the label is the club each member joined after the split, 2 classes),
one-hot node features. One sample is a node (its index, a ``(1,)`` integer row); the
model runs on the whole graph and returns that node's logits, so the kernel couples the
nodes through message passing. ``[data] train`` nodes (default 70 %, after one shuffle with
``[data] seed``) train, the rest are held out; the probe sets are the first ``[probe]
train`` and ``[probe] test`` of each.

**graphs** (graph classification): :func:`benchmark`, a seeded synthetic set with a known
signal: 400 Erdős–Rényi graphs of 8 to 16 nodes, class 0 with edge probability 0.25,
class 1 with 0.35 (the signal is the density); node features a constant 1 and the degree
over 16. One sample is one graph, stored as a ``(16, 16 + 2 + 1)`` row: adjacency, features,
a mask of real nodes. The readout is the mean over real nodes.

Layers (``depth`` of them, ``width`` channels, ReLU): GCN ``H' = relu(Â H W + b)`` with
``Â = D^-1/2 (A + I) D^-1/2`` (Kipf & Welling 2017); GIN-0 ``H' = MLP(H + A H)`` with a
two-layer ReLU MLP (Xu et al. 2019). Then Linear(width, classes).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.sweep.config import DataSpec, SweepConfig, TrainSpec
from cvcore.sweep.families.blocks import classification, probe_sets
from cvcore.sweep.train import Task

MAX_NODES = 16
N_GRAPHS = 400


@functools.lru_cache(maxsize=1)
def karate() -> tuple[np.ndarray, np.ndarray]:
    """(adjacency 34×34, club labels 0/1) from networkx's bundled karate club graph."""
    import networkx as nx

    graph = nx.karate_club_graph()
    nodes = sorted(graph.nodes)
    adjacency = nx.to_numpy_array(graph, nodelist=nodes, weight=None)
    labels = np.array([0 if graph.nodes[n]["club"] == "Mr. Hi" else 1 for n in nodes])
    return adjacency.astype(np.float32), labels.astype(np.int64)


@functools.lru_cache(maxsize=2)
def benchmark(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic graph-classification set (see the module): (rows, labels)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((N_GRAPHS, MAX_NODES, MAX_NODES + 3), dtype=np.float32)
    labels = np.arange(N_GRAPHS) % 2
    for g in range(N_GRAPHS):
        n = int(rng.integers(8, MAX_NODES + 1))
        p = 0.35 if labels[g] else 0.25
        upper = np.triu(rng.random((n, n)) < p, 1)
        adjacency = (upper | upper.T).astype(np.float32)
        rows[g, :n, :n] = adjacency
        rows[g, :n, MAX_NODES] = 1.0
        rows[g, :n, MAX_NODES + 1] = adjacency.sum(1) / MAX_NODES
        rows[g, :n, MAX_NODES + 2] = 1.0
    return rows, labels.astype(np.int64)


def _split(n: int, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(spec.seed).permutation(n)
    n_train = spec.train if spec.train is not None else round(0.7 * n)
    if n_train >= n:
        raise InputError(f"[data] train: expected fewer than the {n} samples of "
                         f"{spec.dataset!r}, got {n_train}")
    test = order[n_train:]
    if spec.test is not None:
        if spec.test > test.size:
            raise InputError(f"[data] test: expected at most {test.size} samples, got "
                             f"{spec.test}")
        test = test[:spec.test]
    return order[:n_train], test


def task(config: SweepConfig, params: dict[str, Any], recipe: TrainSpec, seed: int) -> Task:
    import torch

    if recipe.loss != "cross_entropy":
        raise InputError(f"[train] loss: expected cross_entropy for the gnn family, got "
                         f"{recipe.loss!r}")
    if config.data.dataset == "karate":
        adjacency, labels = karate()
        tr, te = _split(len(labels), config.data)
        x = torch.arange(len(labels)).reshape(-1, 1)
        tags: dict[str, Any] = {"graph": "karate", "nodes": len(labels)}
        in_features = len(labels)
        x_tr, x_te = x[tr], x[te]
    else:
        rows, labels = benchmark(0)
        tr, te = _split(len(labels), config.data)
        x = torch.from_numpy(rows)
        x_tr, x_te = x[tr], x[te]
        adjacency = np.zeros((0, 0), dtype=np.float32)
        tags = {"graph": "synthetic density benchmark", "graphs": N_GRAPHS}
        in_features = 2
    y = torch.from_numpy(labels)
    y_tr, y_te = y[tr], y[te]
    loss, evaluate = classification(x_tr, y_tr, x_te, y_te)
    return Task(x_tr, y_tr, probe_sets(config, x_tr, x_te), loss, evaluate,
                in_features=in_features, out_features=2, tags=tags, family="gnn", n_test=len(x_te),
                extra={"adjacency": adjacency if adjacency.size else None})


def normalized(adjacency: Any, mask: Any) -> Any:
    """D^-1/2 (A + I) D^-1/2 over the real nodes (batched: (..., n, n))."""
    import torch

    eye = torch.diag_embed(mask)
    a = adjacency + eye
    degree = a.sum(-1).clamp(min=1e-12)
    inv = torch.where(mask > 0, degree.rsqrt(), torch.zeros_like(degree))
    return inv[..., :, None] * a * inv[..., None, :]


def build(params: dict[str, Any], task: Task) -> Any:
    import torch
    from torch import nn

    width, depth, kind = int(params["width"]), int(params["depth"]), params.get("conv", "gcn")
    adjacency = task.extra.get("adjacency")
    node_level = adjacency is not None

    class Layer(nn.Module):
        def __init__(self, fan_in: int) -> None:
            super().__init__()
            if kind == "gcn":
                self.lin: nn.Module = nn.Linear(fan_in, width)
            else:
                self.lin = nn.Sequential(nn.Linear(fan_in, width), nn.ReLU(),
                                         nn.Linear(width, width))

        def forward(self, h: Any, a: Any, a_hat: Any) -> Any:
            if kind == "gcn":
                return torch.relu(a_hat @ self.lin(h))
            return torch.relu(self.lin(h + a @ h))

    class GNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            fans = [task.in_features] + [width] * depth
            self.layers = nn.ModuleList(Layer(fans[i]) for i in range(depth))
            self.head = nn.Linear(width, task.out_features)
            if node_level:
                a = torch.tensor(adjacency, dtype=torch.float32)
                self.register_buffer("a", a)
                self.register_buffer("a_hat", normalized(a, torch.ones(len(a))))

        def embed(self, h: Any, a: Any, a_hat: Any) -> Any:
            for layer in self.layers:
                h = layer(h, a, a_hat)
            return h

        def forward(self, x: Any) -> Any:
            if node_level:  # x: (batch, 1) node indices into the fixed graph
                a: Any = self.a
                h = self.embed(torch.eye(len(a), dtype=a.dtype), a, self.a_hat)
                return self.head(h[x[:, 0]])
            a, feats, mask = (x[..., :MAX_NODES], x[..., MAX_NODES:MAX_NODES + 2],
                              x[..., MAX_NODES + 2])
            h = self.embed(feats, a, normalized(a, mask)) * mask[..., None]
            pooled = h.sum(-2) / mask.sum(-1, keepdim=True).clamp(min=1)
            return self.head(pooled)

    return GNN()
