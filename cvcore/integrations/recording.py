"""What every trainer's callback does with a Recorder: the keys of the scalars it logs, in
a fixed order, and the final model's record at the end of training.

Apart from :mod:`.common` because the Recorder itself imports the TensorBoard writer,
which uses :mod:`.common`.
"""

from __future__ import annotations

from typing import Any

from cvcore.integrations.common import PREFIX
from cvcore.record.recorder import Recorder
from cvcore.record.store import Record
from cvcore.spectrum import SCALARS


def scalar_keys(recorder: Recorder, prefix: str = PREFIX) -> list[str]:
    """Every key :func:`scalars` can give for ``recorder``'s records, in a fixed order:
    loggers that fix their columns at the first row (Keras' ``CSVLogger``) see them all."""
    names = SCALARS if recorder.variables is None else tuple(recorder.variables)
    names += tuple(v for v in recorder.dynamics
                   if v not in ("top_eigenvalues", "residual_fractions"))  # arrays: not scalars
    keys: dict[str, None] = {}
    subsets: dict[str, int] = {}
    for part in recorder.parts:
        if part.subset is not None:
            subsets[part.probe_set] = subsets.get(part.probe_set, 0) + 1
            continue
        for var in names:
            keys["/".join(p for p in (prefix, part.probe_set, part.label, var) if p)] = None
    for probe_set, count in subsets.items():
        for var in names:
            keys[f"{prefix}/{probe_set}/{var}"] = None
            if count > 1:
                keys[f"{prefix}/{probe_set}/{var}_std"] = None
    return list(keys)


def record_final(recorder: Recorder, step: int, model: Any, loss: Any = None,
                 **extra: Any) -> Record | None:
    """Record the model at the end of training, whether or not ``every`` makes ``step``
    due; nothing when ``step`` is recorded already (the last record's step)."""
    done = recorder.records()
    if done and done[-1].step >= step:
        return None
    every = recorder.every
    recorder.every = 1  # the final model is recorded whatever the interval
    try:
        return recorder.record(step, model, loss=loss, **extra)
    finally:
        recorder.every = every
