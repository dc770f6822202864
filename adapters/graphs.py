"""Graph neural networks (PyTorch Geometric): the samples are the nodes of one graph."""

from __future__ import annotations

import sys
from typing import Any

from cvcore.protocols import OutputSelector


def _node_model(model: Any, data: Any) -> Any:
    import torch

    class NodeOutputs(torch.nn.Module):
        """``forward(idx)`` runs the whole graph and returns the rows of nodes ``idx``."""

        def __init__(self) -> None:
            super().__init__()
            self.gnn = model
            self.x = data.x
            self.edge_index = data.edge_index

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            ref = next(self.gnn.parameters())
            out = self.gnn(self.x.to(device=ref.device, dtype=ref.dtype),
                           self.edge_index.to(ref.device))
            return out[idx.to(ref.device)]

    return NodeOutputs()


class GraphAdapter:
    """For a PyTorch Geometric model called as ``model(x, edge_index)`` with inputs given
    as a ``torch_geometric.data.Data`` graph: the kernel is over the graph's nodes
    (``K_ij`` couples node i's and node j's outputs, each computed on the whole graph).
    To measure a subset of nodes, pass ``(data, node_indices)``."""

    name = "torch-geometric"

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("torch_geometric") is not None

    def accepts(self, model: object) -> bool:
        pyg = sys.modules.get("torch_geometric")
        if pyg is None:
            return False
        from torch_geometric.nn import MessagePassing

        modules = getattr(model, "modules", None)
        return callable(modules) and any(isinstance(m, MessagePassing) for m in modules())

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        import torch
        from torch_geometric.data import Data

        data, nodes = (inputs if isinstance(inputs, tuple) and len(inputs) == 2
                       and isinstance(inputs[0], Data) else (inputs, None))
        if not isinstance(data, Data):
            return model, inputs, output
        if nodes is None:
            nodes = torch.arange(data.num_nodes)
        return _node_model(model, data), torch.as_tensor(nodes, dtype=torch.long), output
