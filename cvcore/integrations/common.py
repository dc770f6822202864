"""What every integration shares: the library check and the record's values as scalars."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from cvcore import imports
from cvcore.record.store import Record

#: The prefix of every scalar an integration hands to a library's logger.
PREFIX = "cv"


def require(module: str, install: str) -> ModuleType:
    """``module`` imported, or a one-line :class:`MissingFrameworkError` naming
    ``pip install <install>`` (:func:`cvcore.imports.require`)."""
    return imports.require(module, install=f"pip install {install}")


def is_graph_probe(probe: Any) -> bool:
    """Whether a probe (or one of its named sets) is graph inputs (PyTorch Geometric
    ``Data``, ``(Data, nodes)``, a ``Batch`` or a list of ``Data``), decided without
    importing PyTorch Geometric."""
    from cvcore.adapters.graphs import is_graph_input

    sets = probe.values() if isinstance(probe, Mapping) else (probe,)
    return any(is_graph_input(v) for v in sets)


def scalars(record: Record, prefix: str = PREFIX) -> dict[str, float]:
    """The record's summary values as ``{"<prefix>/<set>[/<class>]/<variable>": value}``.

    Whole probe sets and the mean over subsets (with ``.../<variable>_std`` beside it);
    one key per class for class-wise kernels; values that are not finite are left out
    (loggers differ on NaN).

    >>> from cvcore.record.store import Value
    >>> r = Record(step=0, values=(Value("test", "trace", 2.0),
    ...                            Value("train", "trace", 2.5, subset=0),
    ...                            Value("train", "trace", 2.5, std=0.5, count=2)))
    >>> scalars(r)
    {'cv/test/trace': 2.0, 'cv/train/trace': 2.5, 'cv/train/trace_std': 0.5}
    """
    out: dict[str, float] = {}
    for v in record.values:
        if v.subset is not None or v.value is None or not math.isfinite(v.value):
            continue
        key = "/".join(part for part in (prefix, v.probe_set, v.label, v.variable) if part)
        out[key] = float(v.value)
        if v.std is not None and math.isfinite(v.std):
            out[key + "_std"] = float(v.std)
    return out
