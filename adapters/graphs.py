"""Graph neural networks (PyTorch Geometric): nodes of one graph, or graphs of a batch.

Node level (inputs a ``Data`` graph, or ``(Data, node_indices)``): each probe node is a
sample and the graph is fixed; node i's output is computed on the whole graph, so
``K_ij`` couples nodes through message passing. Graph level (inputs a ``Batch`` or a
list of ``Data``): each graph is a sample; the model is called once on the batch and
row g of its output is graph g's (graphs of a batch never exchange messages, and the
kernel is measured in eval mode, so this equals calling the model on each graph alone).
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

from cvcore.adapter_base import AdapterBase
from cvcore.errors import InputError, ModelError
from cvcore.protocols import OutputSelector

#: Graph attributes passed as keywords when the model's ``forward`` names them.
OPTIONAL_ATTRS = ("edge_weight", "edge_attr", "batch")


def call_style(model: Any) -> str:
    """``"data"`` when ``forward`` takes one required argument (a ``Data`` object),
    else ``"tensors"`` (``forward(x, edge_index, ...)``, with ``edge_weight``,
    ``edge_attr`` and ``batch`` passed by name when ``forward`` has them)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "tensors"
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return "data" if len(required) == 1 else "tensors"


def _keywords(model: Any) -> tuple[set[str], set[str]]:
    """The optional graph attributes ``forward`` names, and those it requires."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set(), set()
    named = {n for n in OPTIONAL_ATTRS if n in params}
    return named, {n for n in named if params[n].default is params[n].empty}


def graph_model(model: Any, graph: Any, level: str, output: OutputSelector | None) -> Any:
    """A module whose ``forward(idx)`` runs ``model`` on the whole ``graph`` and returns
    the output rows ``idx`` (nodes at node level, graphs at graph level)."""
    import torch

    from cvcore import outputs

    style = call_style(model)
    named, required = _keywords(model)
    rows = int(graph.num_graphs if level == "graph" else graph.num_nodes)

    class GraphOutputs(torch.nn.Module):
        cvcore_wraps = "gnn"  # per-layer rows name the user's modules (torch layers.py)

        def __init__(self) -> None:
            super().__init__()
            self.gnn = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            ref = next(self.gnn.parameters())
            g = graph.to(ref.device)
            if style == "data":
                g = copy.copy(g)
                for key, value in list(g.items()):
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        g[key] = value.to(ref.dtype)
                raw = self.gnn(g)
            else:
                kwargs = {}
                for name in named:
                    value = getattr(g, name, None)
                    if value is None and name == "batch" and name in required:
                        value = torch.zeros(g.num_nodes, dtype=torch.long, device=ref.device)
                    if value is not None:
                        kwargs[name] = (value.to(ref.dtype) if value.is_floating_point()
                                        else value)
                x = g.x.to(ref.dtype) if g.x.is_floating_point() else g.x
                raw = self.gnn(x, g.edge_index, **kwargs)
            out = outputs.select_output(raw, output, is_leaf=lambda v: isinstance(v, torch.Tensor))
            if out.dim() == 0 or out.shape[0] != rows:
                what = ("one row per graph" if level == "graph" else "one row per node")
                hint = (": a graph-level model pools each graph's nodes with the batch vector, "
                        "e.g. global_mean_pool(h, batch)" if level == "graph" else "")
                raise ModelError(f"expected the model's output to have {what} ({rows}), got "
                                 f"shape {tuple(out.shape)}{hint}")
            return out[idx.to(ref.device)]

    return GraphOutputs()


def is_graph_input(inputs: Any) -> bool:
    """Whether ``inputs`` are graph inputs (a ``Data``, ``(Data, nodes)``, a ``Batch`` or a
    list / tuple of ``Data``), decided without importing PyTorch Geometric: inputs made
    with it exist only once it is imported."""
    pyg = sys.modules.get("torch_geometric.data")
    if pyg is None:
        return False
    data = pyg.Data
    if isinstance(inputs, data):  # a Batch is a Data too
        return True
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], data):
        return (all(isinstance(g, data) for g in inputs)
                or isinstance(inputs, tuple) and len(inputs) == 2)
    return False


def split_inputs(inputs: Any) -> tuple[Any, Any, str] | None:
    """``(graph, sample indices, level)`` for graph inputs, ``None`` for anything else."""
    import torch
    from torch_geometric.data import Batch, Data

    if isinstance(inputs, Batch):
        return inputs, torch.arange(inputs.num_graphs), "graph"
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(g, Data) for g in inputs):
        return Batch.from_data_list(list(inputs)), torch.arange(len(inputs)), "graph"
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], Data):
        graph, nodes = inputs
        nodes = torch.as_tensor(nodes, dtype=torch.long).reshape(-1)
        if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= graph.num_nodes):
            raise InputError(f"expected node indices between 0 and {graph.num_nodes - 1}, got "
                             f"{int(nodes.min())}..{int(nodes.max())}")
        return graph, nodes, "node"
    if isinstance(inputs, Data):
        return inputs, torch.arange(inputs.num_nodes), "node"
    return None


class GraphAdapter(AdapterBase):
    """For a PyTorch Geometric model: called as ``model(x, edge_index)``,
    ``model(x, edge_index, batch)`` or ``model(data)``; inputs a ``Data`` graph (each node
    a sample), ``(Data, node_indices)`` (those nodes), or a ``Batch`` / list of ``Data``
    (each graph a sample). ``output=`` picks among the model's outputs as usual; rows
    are then taken per node or per graph."""

    name = "torch-geometric"
    family = "graph"
    library = "torch_geometric"
    extra = "adapters"
    expects = ("a torch.nn.Module on a Data graph, (Data, node indices), a Batch or a list "
               "of Data")

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

    def accepts_family(self, model: object) -> bool:
        import torch

        return isinstance(model, torch.nn.Module)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        split = split_inputs(inputs)
        if split is None:
            return model, inputs, output
        graph, index, level = split
        return graph_model(model, graph, level, output), index, None

    def count_samples(self, inputs: Any) -> int | None:
        """Nodes of a ``Data`` graph (or the chosen ones), graphs of a ``Batch`` or a list
        of ``Data``; ``None`` for anything else (:class:`cvcore.data_io.SampleContainer`)."""
        if not is_graph_input(inputs):
            return None
        split = split_inputs(inputs)
        assert split is not None
        return int(split[1].numel())

    def take_samples(self, inputs: Any, index: Any) -> Any:
        """Samples ``index`` of graph inputs, of the same kind: ``(Data, nodes)`` for a
        graph's nodes, a ``Batch`` or a list of the chosen graphs."""
        import torch
        from torch_geometric.data import Batch, Data

        chosen = [int(i) for i in index]
        if isinstance(inputs, Batch):
            return Batch.from_data_list(inputs.index_select(chosen))
        if isinstance(inputs, (list, tuple)) and all(isinstance(g, Data) for g in inputs):
            return [inputs[i] for i in chosen]
        split = split_inputs(inputs)
        assert split is not None
        graph, nodes, _ = split
        return graph, nodes[torch.as_tensor(chosen, dtype=torch.long)]

    def describe(self, model: Any, inputs: Any, output: OutputSelector | None) -> str:
        from cvcore.api import output_name

        split = split_inputs(inputs)
        chosen = output_name(output)
        if split is None:
            return chosen or "model output"
        return f"{split[2]}-level output" + ("" if chosen is None else f" {chosen}")
