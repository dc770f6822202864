"""``cv measure ... --out run.db``: a checkpoint series in the same store as a Recorder's.

Each measured checkpoint becomes one record; its step is the last number in the file's
name (``epoch_12.pt`` → 12), else its position in natural order.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from cvcore.errors import InputError
from cvcore.record.recorder import MAX_STEP, SCALARS
from cvcore.record.store import Record, RecordStore, StoreError, Value
from cvcore.rows import Row


def step_of(source: str, position: int) -> int:
    """The step a checkpoint file stands for.

    >>> step_of("runs/epoch_12.pt", 0), step_of("final.pt", 3)
    (12, 3)
    """
    numbers = re.findall(r"\d+", Path(source).stem)
    step = int(numbers[-1]) if numbers else position
    if step > MAX_STEP:  # the store's steps are signed 64-bit integers
        raise InputError(f"{source}: expected a step (the last number in the file name) "
                         f"from 0 to 2^63 - 1, got {step}; rename the checkpoint")
    return step


class CheckpointSink:
    """Writes rows of ``cv measure`` to a record store as one run (created at the first row).

    Args:
        path: the store, a path ending in ``.db`` (created when missing).
        name: the run's name (default: the checkpoints' folder).
        probe: where the probe came from, kept in the run's options.
    """

    def __init__(self, path: Path, *, name: str | None = None,
                 probe: dict[str, Any] | None = None) -> None:
        if not str(path).endswith(".db"):
            raise StoreError(f"expected --out a path ending in .db, got {str(path)!r}")
        self.path = Path(path)
        # An existing file is checked now; a new one is created with the first row, so a
        # run that fails before measuring anything leaves no file behind.
        self._store = RecordStore(path, create=False) if self.path.exists() else None
        self.name = name
        self.probe = dict(probe or {})
        self.run_id: int | None = None
        self.count = 0

    def add(self, row: Row) -> None:
        """Store one measured checkpoint as one record (one transaction)."""
        from cvcore import __version__

        if self._store is None:
            self._store = RecordStore(self.path)
        if self.run_id is None:
            self.run_id = self._store.create_run(
                name=self.name or str(Path(row.source).parent),
                source="checkpoints", kernel=row.kernel, dtype=row.dtype,
                cvcore_version=__version__,
                probe_sets={"probe": {"n_samples": row.n_samples, "subsets": None,
                                      "classes": None}},
                options={"probe": self.probe, "backend": row.backend})
        numbers = row.variables.to_dict()
        values = tuple(Value("probe", var, float(numbers[var])) for var in SCALARS
                       if isinstance(numbers.get(var), (int, float))
                       and not (isinstance(numbers[var], float) and math.isnan(numbers[var])))
        record = Record(step=step_of(row.source, self.count), values=values,
                        extras={"source": row.source}, seconds=row.seconds, time=time.time())
        self._store.add_record(self.run_id, record, model={
            "model_class": row.model_class, "framework": row.backend,
            "n_params": row.n_params})
        self.count += 1

    def close(self) -> None:
        """Mark the run finished and close the file."""
        if self._store is None:
            return
        if self.run_id is not None:
            self._store.close_run(self.run_id)
        self._store.close()
