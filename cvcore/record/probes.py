"""The probe of a Recorder: named probe sets, fixed random subsets, classes.

Everything here is decided once, at construction: the same samples are measured at every
step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.data_io import batch_size, take
from cvcore.errors import InputError, describe

#: Keys that mark a dict as named probe sets rather than one model's dict of inputs.
SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation", "eval", "holdout"})
#: The probe set's name when a single probe is given.
DEFAULT_SET = "probe"
class ProbeSets(dict[str, Any]):
    """Named probe sets, explicitly: ``Recorder(ProbeSets(a=x_a, b=x_b))``.

    A plain dict is read as named probe sets when its keys are split names (``train``,
    ``test``, ``val`` ...), when its values are themselves dicts or tuples, or when their
    batch sizes differ; otherwise as one dict of model inputs. This class removes the
    guess.
    """


@dataclass(frozen=True)
class Part:
    """One kernel measured at every step: a whole probe set, one subset, or one class."""

    probe_set: str
    inputs: Any
    subset: int | None = None
    label: str | None = None
    #: the subset's sample indices in its probe set (subsets only)
    index: NDArray[np.int64] | None = None


@dataclass(frozen=True)
class UnionKernel:
    """The kernel (or its diagonal) on the union of one probe set's subsets."""

    matrix: NDArray[Any]
    backend: str
    n_params: int | None
    #: per subset, where its samples sit in the union
    positions: dict[int, NDArray[np.int64]]
    n_samples: int


def split_probe(probe: Any) -> dict[str, Any]:
    """The named probe sets of a Recorder's ``probe`` argument (see :class:`ProbeSets`)."""
    if isinstance(probe, ProbeSets) or isinstance(probe, Mapping) and probe and (
            set(probe) <= SPLIT_NAMES
            or all(isinstance(v, (Mapping, tuple, list)) for v in probe.values())
            or len({probe_size(v) for v in probe.values()}) > 1):
        sets = dict(probe)
    else:
        sets = {DEFAULT_SET: probe}
    if not sets:
        raise InputError("expected a probe (an array, a tensor, or named probe sets), got an "
                         "empty dict")
    for name, inputs in sets.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"expected probe set names to be non-empty strings, got {name!r}")
        if probe_size(inputs) == 0:
            raise InputError(f"expected probe set {name!r} to hold at least one sample, got 0")
    return sets


def probe_size(inputs: Any) -> int:
    try:
        return batch_size(inputs)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - anything without a usable shape
        raise InputError(f"expected probe inputs with a batch dimension, got "
                         f"{describe(inputs)}") from None


def _as_labels(labels: Any, n: int, name: str) -> NDArray[Any]:
    """Labels as a 1-D NumPy array of length ``n`` (tensors are copied to the host)."""
    for attr in ("detach", "cpu", "numpy"):
        if hasattr(labels, attr) and not isinstance(labels, np.ndarray):
            labels = getattr(labels, attr)()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InputError(f"expected labels of length {n} for probe set {name!r} (one per "
                         f"sample), got shape {arr.shape}")
    return arr


def make_parts(sets: Mapping[str, Any], *, subsets: tuple[int, int] | None,
               labels: Any, seed: int) -> list[Part]:
    """The kernels of one record: per set, the whole set, K fixed subsets, or each class.

    Subsets are drawn once, with a generator of their own (``numpy.random.default_rng``
    seeded from ``seed`` and the set's position), never from a global random state.
    """
    if subsets is not None and labels is not None:
        raise InputError("expected subsets= or labels=, got both (class-wise kernels are "
                         "measured on every sample of each class)")
    parts: list[Part] = []
    if labels is not None and not isinstance(labels, Mapping):
        if len(sets) != 1:
            raise InputError(f"expected labels= as a dict keyed by probe set "
                             f"{sorted(sets)}, got {describe(labels)}")
        labels = {next(iter(sets)): labels}
    if labels is not None:
        unknown = sorted(set(labels) - set(sets))
        if unknown:
            raise InputError(f"expected labels for probe sets among {sorted(sets)}, got "
                             f"labels for {unknown}")
    for position, (name, inputs) in enumerate(sets.items()):
        n = probe_size(inputs)
        if subsets is not None:
            k, size = _check_subsets(subsets, n, name)
            rng = np.random.default_rng([seed, position])
            for i in range(k):
                index = np.sort(rng.choice(n, size=size, replace=False))
                parts.append(Part(name, take(inputs, index), subset=i, index=index))
        elif labels is not None and name in labels:
            arr = _as_labels(labels[name], n, name)
            for value in np.unique(arr):
                index = np.flatnonzero(arr == value).astype(np.int64)
                parts.append(Part(name, take(inputs, index), label=_label_text(value)))
        else:
            parts.append(Part(name, inputs))
    return parts


def _label_text(value: Any) -> str:
    item = value.item() if hasattr(value, "item") else value
    return str(item)


def _check_subsets(subsets: Any, n: int, name: str) -> tuple[int, int]:
    try:
        k, size = (int(v) for v in subsets)
        ok = (k, size) == tuple(subsets)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"expected subsets=(K, n), two integers, got {subsets!r}")
    if k < 1 or size < 1:
        raise InputError(f"expected subsets=(K, n) with K >= 1 and n >= 1, got ({k}, {size})")
    if size > n:
        raise InputError(f"expected subsets of at most {n} samples (the size of probe set "
                         f"{name!r}), got n = {size}")
    return k, size
