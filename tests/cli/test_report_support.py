"""Record stores with known numbers, written through the public RecordStore API, for the
tests of `cv report`, `cv compare` and `cv plot`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.record import Record, RecordStore, Value

runner = CliRunner()


def invoke(*args: Any):
    return runner.invoke(make_app(), [str(a) for a in args])


def subset_run(store: RecordStore, name: str, per_subset: Mapping[str, np.ndarray], *,
               steps: Sequence[int] | None = None, tags: Mapping[str, Any] | None = None,
               n: int = 5, probe_set: str = "train", loss: Sequence[float] | None = None,
               extras: Sequence[Mapping[str, Any]] | None = None,
               scalars: Mapping[str, Sequence[float]] | None = None) -> int:
    """A run whose variables were measured on K subsets of n samples each.

    ``per_subset[variable]`` is a (records × K) array; each record stores every subset's
    value and their summary (mean, std with ddof=1, count K), as the Recorder does.
    ``scalars`` adds whole-probe values (no subsets), e.g. the kernel-dynamics variables.
    """
    first = next(iter(per_subset.values()))
    records, k = first.shape
    steps = list(range(records)) if steps is None else list(steps)
    run_id = store.create_run(name=name, source="recorder", kernel="traced", dtype="float64",
                              cvcore_version="test",
                              probe_sets={probe_set: {"n_samples": n * k, "subsets": [k, n],
                                                      "classes": None}},
                              options={"seed": 0}, tags=dict(tags or {}))
    for i, step in enumerate(steps):
        values: list[Value] = []
        for var, table in per_subset.items():
            row = np.asarray(table[i], dtype=np.float64)
            values += [Value(probe_set, var, float(v), subset=j) for j, v in enumerate(row)]
            values.append(Value(probe_set, var, float(row.mean()),
                                std=float(row.std(ddof=1)), count=k))
        for var, seq in (scalars or {}).items():
            values.append(Value(probe_set, var, float(seq[i])))
        store.add_record(run_id, Record(step=step, values=tuple(values),
                                        loss=None if loss is None else loss[i],
                                        extras=dict(extras[i]) if extras else {},
                                        seconds=0.1, time=0.0))
    store.close_run(run_id)
    return run_id


def plain_run(store: RecordStore, name: str, values: Mapping[str, Sequence[float]], *,
              n: int = 8, probe_set: str = "probe", source: str = "checkpoints") -> int:
    """A run of one value per record and variable (no subsets): deterministic checkpoints."""
    run_id = store.create_run(name=name, source=source, kernel="traced", dtype="float32",
                              cvcore_version="test",
                              probe_sets={probe_set: {"n_samples": n, "subsets": None,
                                                      "classes": None}})
    length = len(next(iter(values.values())))
    for i in range(length):
        vals = tuple(Value(probe_set, var, float(seq[i])) for var, seq in values.items())
        store.add_record(run_id, Record(step=i, values=vals, seconds=0.1, time=0.0))
    store.close_run(run_id)
    return run_id


def per_subset_table(rng: np.random.Generator, records: int, k: int, start: float,
                     end: float, noise: float) -> np.ndarray:
    """(records × K) subset values moving from ``start`` to ``end`` with subset noise that
    persists over steps (each subset has its own offset), as real subsets do."""
    offsets = rng.normal(0.0, noise, size=k)
    path = np.linspace(start, end, records)[:, None]
    return path + offsets[None, :] + rng.normal(0.0, noise / 4, size=(records, k))
