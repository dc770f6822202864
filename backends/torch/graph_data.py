"""Graphs as probe data: an ``.npz`` of plain arrays read into PyTorch Geometric ``Data``.

No pickle: the archive holds only numeric arrays (``numpy.savez``), read with
``allow_pickle=False`` and checked before anything is built.

=============== ========================= ==============================================
key             dtype, shape              meaning
=============== ========================= ==============================================
``x``           float or int, ``(N, F)``  node features (required)
``edge_index``  int, ``(2, E)``           edges ``source -> target``, each in ``[0, N)``
                                          (required)
``edge_weight`` float, ``(E,)``           one weight per edge (optional)
``edge_attr``   float, ``(E,)``/``(E, D)`` edge features (optional)
``y``           numeric, ``(N,)``/``(G,)`` labels, kept on the graph (optional)
``batch``       int, ``(N,)``             graph id of each node, ``0 .. G-1``, sorted:
                                          the file holds G graphs and each is a sample
                                          (graph level; optional)
``nodes``       int, ``(K,)``             the nodes measured, each a sample (node level;
                                          optional, default every node; not with
                                          ``batch``)
=============== ========================= ==============================================

Without ``batch`` the file is one graph and its nodes are the samples (``Data``, or
``(Data, nodes)``); with ``batch`` it is a list of ``Data``, one per graph, each graph's
edges renumbered from 0 (an edge joining two graphs is refused).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from cvcore.data_io import ZIP_MAGIC, open_npz, read_magic
from cvcore.errors import InputError
from cvcore.imports import require

#: The keys a graph archive must hold, and those it may hold.
REQUIRED = ("x", "edge_index")
OPTIONAL = ("edge_weight", "edge_attr", "y", "batch", "nodes")


def archive_keys(path: Path) -> list[str] | None:
    """The array names of an ``.npz`` archive (``None`` when it is not one)."""
    if not path.is_file() or not read_magic(path).startswith(ZIP_MAGIC):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    if not names or not all(n.endswith(".npy") for n in names):
        return None
    return [n[: -len(".npy")] for n in names]


def is_graph_archive(path: Path) -> bool:
    """An ``.npz`` archive holding ``x`` and ``edge_index``."""
    keys = archive_keys(path)
    return keys is not None and all(k in keys for k in REQUIRED)


def _int_array(arr: NDArray[Any], source: str, key: str, ndim: int) -> NDArray[np.int64]:
    if arr.dtype.kind not in "iu":
        raise InputError(f"{source}: expected {key!r} of an integer dtype, got {arr.dtype}")
    if arr.ndim != ndim:
        raise InputError(f"{source}: expected {key!r} with {ndim} dimension(s), got shape "
                         f"{arr.shape}")
    return arr.astype(np.int64)


def _float_array(arr: NDArray[Any], source: str, key: str) -> NDArray[Any]:
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise InputError(f"{source}: expected {key!r} of a numeric dtype, got {arr.dtype}")
    out = arr.astype(np.float32) if arr.dtype.kind in "iu" else arr
    if not np.isfinite(out).all():
        raise InputError(f"{source}: expected finite values in {key!r}, got NaN or Inf")
    return out


def read_graph_arrays(path: Path) -> dict[str, NDArray[Any]]:
    """The archive's arrays, checked: dtypes, shapes, indices in range (see the module)."""
    source = str(path)
    keys = archive_keys(path)
    if keys is None:
        raise InputError(f"{source}: expected an .npz archive of arrays, got another format")
    missing = [k for k in REQUIRED if k not in keys]
    unknown = sorted(set(keys) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise InputError(f"{source}: expected a graph archive with keys {list(REQUIRED)} and "
                         f"optionally {list(OPTIONAL)}, got {sorted(keys)}")
    arrays = {k: open_npz(path, k) for k in keys}
    x = arrays["x"]
    if x.ndim != 2 or x.shape[0] < 1:
        raise InputError(f"{source}: expected 'x' of shape (nodes, features) with at least "
                         f"one node, got shape {x.shape}")
    arrays["x"] = _float_array(x, source, "x")
    n = x.shape[0]
    edges = _int_array(arrays["edge_index"], source, "edge_index", 2)
    if edges.shape[0] != 2:
        raise InputError(f"{source}: expected 'edge_index' of shape (2, edges), got shape "
                         f"{edges.shape}")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise InputError(f"{source}: expected 'edge_index' entries between 0 and {n - 1} (the "
                         f"nodes of 'x'), got {int(edges.min())}..{int(edges.max())}")
    arrays["edge_index"] = edges
    n_edges = edges.shape[1]
    for key in ("edge_weight", "edge_attr"):
        if key in arrays:
            arr = _float_array(arrays[key], source, key)
            if arr.ndim not in ((1,) if key == "edge_weight" else (1, 2)) \
                    or arr.shape[0] != n_edges:
                want = "(edges,)" if key == "edge_weight" else "(edges,) or (edges, features)"
                raise InputError(f"{source}: expected {key!r} of shape {want} with "
                                 f"{n_edges} edges, got shape {arr.shape}")
            arrays[key] = arr
    if "batch" in arrays and "nodes" in arrays:
        raise InputError(f"{source}: expected 'batch' (graphs are the samples) or 'nodes' "
                         "(nodes are the samples), got both")
    if "batch" in arrays:
        arrays["batch"] = _check_batch(arrays["batch"], n, edges, source)
    if "nodes" in arrays:
        nodes = _int_array(arrays["nodes"], source, "nodes", 1)
        if nodes.size == 0 or nodes.min() < 0 or nodes.max() >= n:
            got = "none" if nodes.size == 0 else f"{int(nodes.min())}..{int(nodes.max())}"
            raise InputError(f"{source}: expected 'nodes' between 0 and {n - 1}, got {got}")
        arrays["nodes"] = nodes
    if "y" in arrays:
        y = arrays["y"]
        if y.dtype.kind not in "fiub" or y.ndim < 1:
            raise InputError(f"{source}: expected 'y' numeric with one row per node or graph, "
                             f"got {y.dtype} of shape {y.shape}")
    return arrays


def _check_batch(batch: NDArray[Any], n: int, edges: NDArray[np.int64],
                 source: str) -> NDArray[np.int64]:
    b = _int_array(batch, source, "batch", 1)
    if b.shape[0] != n:
        raise InputError(f"{source}: expected 'batch' with one graph id per node ({n}), got "
                         f"shape {b.shape}")
    if b[0] != 0 or np.any(np.diff(b) < 0) or np.any(np.diff(b) > 1):
        raise InputError(f"{source}: expected 'batch' sorted graph ids 0, 1, ... without gaps "
                         f"(every node of graph g before those of g + 1), got "
                         f"{b[:8].tolist()}{' ...' if n > 8 else ''}")
    if edges.size and np.any(b[edges[0]] != b[edges[1]]):
        raise InputError(f"{source}: expected every edge inside one graph of 'batch', got an "
                         "edge joining two graphs")
    return b


def graph_inputs(arrays: dict[str, NDArray[Any]]) -> Any:
    """PyTorch Geometric inputs from checked arrays: ``Data``, ``(Data, nodes)`` or a list
    of ``Data`` (one per graph of ``batch``)."""
    torch = require("torch")
    data_mod = require("torch_geometric.data", "adapters", name="torch_geometric")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()
               if k not in ("batch", "nodes")}
    if "batch" not in arrays:
        graph = data_mod.Data(**tensors)
        if "nodes" in arrays:
            return graph, torch.from_numpy(arrays["nodes"])
        return graph
    batch = arrays["batch"]
    n_graphs = int(batch[-1]) + 1
    starts = np.searchsorted(batch, np.arange(n_graphs))
    ends = np.searchsorted(batch, np.arange(n_graphs), side="right")
    edge_graph = batch[arrays["edge_index"][0]]
    y = arrays.get("y")
    out = []
    for g in range(n_graphs):
        lo, hi = int(starts[g]), int(ends[g])
        edge_mask = edge_graph == g
        fields: dict[str, Any] = {
            "x": tensors["x"][lo:hi],
            "edge_index": torch.from_numpy(arrays["edge_index"][:, edge_mask] - lo)}
        for key in ("edge_weight", "edge_attr"):
            if key in tensors:
                fields[key] = tensors[key][torch.from_numpy(edge_mask)]
        if y is not None:
            fields["y"] = (tensors["y"][g:g + 1] if y.shape[0] == n_graphs
                           else tensors["y"][lo:hi])
        out.append(data_mod.Data(**fields))
    return out


def save_graph(path: str | Path, graph: Any, nodes: Any = None) -> None:
    """Write a ``Data`` graph (optionally ``nodes``), a ``Batch`` or a list of ``Data`` as
    a graph archive (the inverse of :class:`GraphDataLoader`)."""
    from torch_geometric.data import Batch, Data

    from cvcore.files import atomic_output

    arrays: dict[str, Any] = {}
    if isinstance(graph, (list, tuple)):
        graph = Batch.from_data_list(list(graph))
    if isinstance(graph, Batch):
        arrays["batch"] = graph.batch.numpy()
    elif not isinstance(graph, Data):
        raise InputError(f"expected a Data graph, a Batch or a list of Data, got "
                         f"{type(graph).__name__}")
    for key in ("x", "edge_index", "edge_weight", "edge_attr", "y"):
        value = getattr(graph, key, None)
        if value is not None:
            arrays[key] = value.detach().cpu().numpy()
    if nodes is not None:
        arrays["nodes"] = np.asarray(nodes, dtype=np.int64)
    with atomic_output(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


@dataclass(frozen=True)
class GraphDataLoader:
    """Graphs from an ``.npz`` archive with ``x`` and ``edge_index`` (no pickle), read
    into PyTorch Geometric inputs (see the module)."""

    kind: Literal["data"] = "data"
    name: str = "graph-npz"

    def claims(self, spec: str) -> bool:
        return is_graph_archive(Path(spec))

    def load(self, spec: str, key: str | None) -> Any:
        if key is not None:
            raise InputError(f"{spec}: expected no --key for a graph archive (it is read as "
                             f"a whole), got --key {key}")
        return graph_inputs(read_graph_arrays(Path(spec)))
