"""Recording collective variables during training, and reading the records back.

``Recorder`` measures a model at chosen steps on a fixed probe; ``RecordStore`` is the
crash-safe SQLite file the records land in; ``summary`` summarises a run (the numbers
``cv report`` prints) without pandas; ``checkpoint_sink`` writes a ``cv measure``
checkpoint series into a store.
"""

from __future__ import annotations

from cvcore.record.probes import ProbeSets
from cvcore.record.recorder import Recorder, cost_summary
from cvcore.record.store import (
    SCHEMA_VERSION,
    ArrayValue,
    Record,
    RecordStore,
    RunInfo,
    StoreError,
    Value,
    read_runs,
)

__all__ = ["SCHEMA_VERSION", "ArrayValue", "ProbeSets", "Record", "RecordStore", "Recorder", "RunInfo",
           "StoreError", "Value", "cost_summary", "read_runs"]
