"""What a recorded run says: start, end, change with its uncertainty, and the regime.

The numbers ``cv report`` prints, computed here on NumPy (the CLI only formats them).
Conventions (``docs/recording.md``, "Commands": ``cv report``):

* start is the first record, end the last; ``change = end − start``;
* the uncertainty of a value is the standard error over probe subsets (``std / √K``) when
  subsets were recorded, else the scatter of the last records: the standard deviation of
  their successive differences over ``√2`` (a linear trend does not count as noise), taken
  as the noise of each single record;
* the entropy's regime: a change within two standard errors is "within noise", a fall is
  "compression", a rise "structure formation"; without an uncertainty it is
  "undetermined".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cvcore.record.recorder import cost_summary
from cvcore.record.store import Record, RecordStore, RunInfo, series_of

#: How many of the last records give the scatter when there are no subsets.
SCATTER_RECORDS = 5
#: A change smaller than this many standard errors is within noise.
NOISE_SIGMAS = 2.0


def groups(records: Sequence[Record]) -> list[tuple[str, str | None]]:
    """The (probe set, class) pairs that have summary values, in first-seen order."""
    seen: dict[tuple[str, str | None], None] = {}
    for rec in records:
        for v in rec.values:
            if v.subset is None:
                seen.setdefault((v.probe_set, v.label), None)
    return list(seen)


def variables_of(records: Sequence[Record], probe_set: str, label: str | None) -> list[str]:
    """The variables recorded for one group, in first-seen order."""
    seen: dict[str, None] = {}
    for rec in records:
        for v in rec.values:
            if v.subset is None and v.probe_set == probe_set and v.label == label:
                seen.setdefault(v.variable, None)
    return list(seen)


def series(records: Sequence[Record], probe_set: str, label: str | None, variable: str
           ) -> dict[str, np.ndarray]:
    """step, value, std, count, loss and seconds of one variable of one group."""
    return series_of(records, variable, probe_set=probe_set, label=label)


def _stderr(s: dict[str, np.ndarray], i: int) -> float:
    """The standard error of the i-th value over its subsets (NaN without subsets)."""
    std, count = float(s["std"][i]), int(s["count"][i])
    return std / math.sqrt(count) if count > 1 and math.isfinite(std) else math.nan


def scatter(values: np.ndarray, last: int = SCATTER_RECORDS) -> float:
    """The noise of one record from the last ``last`` values: ``std(diff) / √2``.

    >>> round(scatter(np.array([0.0, 1.0, 2.0, 3.0, 4.0])), 12)  # a pure trend: no noise
    0.0
    >>> bool(np.isnan(scatter(np.array([1.0, 2.0]))))
    True
    """
    tail = values[-last:]
    tail = tail[np.isfinite(tail)]
    if tail.size < 3:
        return math.nan
    return float(np.std(np.diff(tail), ddof=1) / math.sqrt(2.0))


def change(values: dict[str, np.ndarray]) -> dict[str, Any]:
    """Start, end, change and its standard error for one series."""
    v = values["value"]
    start, end = float(v[0]), float(v[-1])
    se_start, se_end = _stderr(values, 0), _stderr(values, len(v) - 1)
    source: str | None
    if math.isfinite(se_start) and math.isfinite(se_end):
        source = "subsets"
        se = math.hypot(se_start, se_end)
    else:
        noise = scatter(v)
        source = f"scatter of the last {min(SCATTER_RECORDS, len(v))} records" \
            if math.isfinite(noise) else None
        se_start = se_end = noise
        se = math.sqrt(2.0) * noise
    return {"start": start, "end": end, "change": end - start, "change_se": se,
            "start_se": se_start, "end_se": se_end, "uncertainty": source,
            "first_step": int(values["step"][0]), "last_step": int(values["step"][-1]),
            "records": len(v)}


def regime(delta: float, se: float) -> str:
    """The entropy's regime for a change ``delta`` with standard error ``se``.

    >>> regime(-0.3, 0.1), regime(0.3, 0.1), regime(0.1, 0.1), regime(0.1, float("nan"))
    ('compression', 'structure formation', 'within noise', 'undetermined')
    """
    if not math.isfinite(se):
        return "undetermined"
    if abs(delta) < NOISE_SIGMAS * se:
        return "within noise"
    return "compression" if delta < 0 else "structure formation"


def summarize_group(records: Sequence[Record], probe_set: str, label: str | None
                    ) -> dict[str, Any]:
    """The report of one probe set (or class) of one run."""
    out: dict[str, Any] = {"probe_set": probe_set, "label": label, "variables": {}}
    for var in variables_of(records, probe_set, label):
        s = series(records, probe_set, label, var)
        if s["value"].size == 0:
            continue
        entry = change(s)
        if var == "entropy":
            finite = np.where(np.isfinite(s["value"]), s["value"], np.inf)
            i = int(np.argmin(finite))
            entry.update(min=float(s["value"][i]), min_step=int(s["step"][i]),
                         end_minus_min=entry["end"] - float(s["value"][i]))
        if var in ("trace", "normalized_trace"):
            ok = entry["start"] > 0 and entry["end"] > 0
            entry.update(growth_factor=entry["end"] / entry["start"] if ok else math.nan,
                         log_change=math.log(entry["end"] / entry["start"]) if ok else math.nan)
        out["variables"][var] = entry
    ent = out["variables"].get("entropy")
    if ent is not None:
        out["regime"] = regime(ent["change"], ent["change_se"])
        sig = abs(ent["change"]) / ent["change_se"] if ent["change_se"] > 0 else math.inf
        out["regime_sigmas"] = sig if math.isfinite(ent["change_se"]) else math.nan
    else:
        out["regime"] = None
        out["regime_sigmas"] = math.nan
    return out


def summarize_run(store: RecordStore, info: RunInfo) -> dict[str, Any]:
    """The report of one run: metadata, cost, loss, and every probe set's changes."""
    records = store.records(info.id)
    losses = [r.loss for r in records if r.loss is not None]
    return {
        "run_id": info.id, "run_name": info.name, "path": store.path,
        "source": info.source, "model_class": info.model_class, "framework": info.framework,
        "n_params": info.n_params, "kernel": info.kernel, "dtype": info.dtype,
        "finished": info.closed is not None, "records": len(records),
        "steps": [records[0].step, records[-1].step] if records else None,
        "loss": {"start": losses[0], "end": losses[-1]} if losses else None,
        "cost_seconds": cost_summary([r.seconds for r in records]),
        "probe_sets": [summarize_group(records, ps, lab) for ps, lab in groups(records)],
    }


def summarize(store: RecordStore, run: int | str | None = None) -> list[dict[str, Any]]:
    """The report of every run in a store (or of one, by id or name)."""
    runs = store.runs() if run is None else [store.run(run)]
    return [summarize_run(store, info) for info in runs]
