"""The NTK of graph networks: node level on the Karate Club graph, graph level on a batch.

Node level: each probe node is a sample and the graph is fixed (every node's output is
computed on the whole graph). Graph level: each graph of a ``Batch`` (or a list of
``Data``) is a sample. Runs in seconds on a CPU; needs ``pip install 'cvcore[adapters]'``.

    python examples/graph_kernel.py
"""

from __future__ import annotations

import torch
from torch_geometric.data import Batch, Data
from torch_geometric.datasets import KarateClub  # shipped inside PyTorch Geometric
from torch_geometric.nn import GCNConv, global_mean_pool
from torch_geometric.nn.models import GCN

from cvcore.api import build, make_request
from cvcore.spectrum import collective_variables


class GraphClassifier(torch.nn.Module):
    """Two GCN layers, mean pooling per graph, a linear read-out."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = GCNConv(features, 16), GCNConv(16, 16)
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x, edge_index))
        h = torch.relu(self.conv2(h, edge_index))
        return self.head(global_mean_pool(h, batch))


def random_graphs(count: int, features: int, seed: int = 0) -> list[Data]:
    gen = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(count):
        n = int(torch.randint(4, 10, (1,), generator=gen))
        edges = torch.randint(0, n, (2, 2 * n), generator=gen)
        graphs.append(Data(x=torch.randn(n, features, generator=gen),
                           edge_index=torch.cat([edges, edges.flip(0)], dim=1)))
    return graphs


def report(label: str, measured) -> None:
    cv = collective_variables(measured.result.kernel)
    print(f"{label:<34} family={measured.family:<6} output={measured.output!r:<22} "
          f"N={measured.result.n_samples:<3} trace={cv.trace:10.4g} entropy={cv.entropy:.4f}")


def main() -> None:
    torch.manual_seed(0)
    karate = KarateClub()[0]
    gcn = GCN(in_channels=karate.num_features, hidden_channels=16, num_layers=2,
              out_channels=4)
    # implementation="jacobian": the per-sample Jacobian path, exact for node-level kernels
    request = make_request(implementation="jacobian")
    report("Karate Club, all 34 nodes", build(gcn, karate, request=request))
    report("Karate Club, nodes 0, 33 (leaders)", build(gcn, (karate, [0, 33]), request=request))
    graphs = random_graphs(12, features=3)
    model = GraphClassifier(features=3, classes=2)
    report("12 random graphs (Batch)", build(model, Batch.from_data_list(graphs)))


if __name__ == "__main__":
    main()
