"""What a recorded run says: start, end, change with its uncertainty, and the regime.

The numbers ``cv report`` prints, computed here on NumPy (the CLI only formats them).
Conventions (``docs/recording.md``, "Commands": ``cv report``):

* start is the first record, end the last; ``change = end − start``;
* an uncertainty is given only where the run holds something to measure it by: the probe
  subsets. The subsets are the same samples at every step, so the change's standard error
  is the paired one, ``std_k(end_k − start_k) / √K`` over the K subsets (with only the
  subsets' summaries stored: the two endpoints' errors ``std / √K`` in quadrature); with
  ``boot`` resamples, a bootstrap over the K subsets instead. Seeds are the other source:
  :mod:`cvcore.record.compare` pools runs that differ only in their seed;
* a run without subsets (deterministic checkpoints, one kernel per record) has no
  uncertainty, and says so: the change is printed bare and the regime is "undetermined".
  The step-to-step scatter of a run is not an error bar (it mixes training's own motion
  with noise), so it is never used as one;
* the entropy's regime: a change within two standard errors is "within noise", a fall is
  "compression", a rise "structure formation"; without an uncertainty "undetermined".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError
from cvcore.record.recorder import cost_summary
from cvcore.record.store import Record, RecordStore, RunInfo, series_of

#: A change smaller than this many standard errors is within noise.
NOISE_SIGMAS = 2.0
#: The words for a value without an uncertainty.
NO_UNCERTAINTY = "none: no subsets recorded (one value per record)"
#: Kernel-dynamics variables the report summarises beyond start and end.
DYNAMICS = ("target_alignment", "residual_alignment", "kernel_distance",
            "kernel_distance_init", "kernel_velocity", "eigenspace_overlap",
            "eigenspace_overlap_init")


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


def subset_values(record: Record, probe_set: str, label: str | None, variable: str
                  ) -> dict[int, float]:
    """Each subset's own value of one variable in one record: ``{subset index: value}``."""
    return {v.subset: v.value for v in record.values
            if v.subset is not None and v.variable == variable and v.probe_set == probe_set
            and v.label == label and math.isfinite(v.value)}


def _stderr(s: dict[str, np.ndarray], i: int) -> float:
    """The standard error of the i-th value over its subsets (NaN without subsets)."""
    std, count = float(s["std"][i]), int(s["count"][i])
    return std / math.sqrt(count) if count > 1 and math.isfinite(std) else math.nan


def paired(start: NDArray[np.float64], end: NDArray[np.float64]) -> dict[str, float]:
    """Standard errors from K paired subset values at start and end.

    ``change_se = std(end − start, ddof=1) / √K``; ``log_se`` is the delta-method error of
    ``ln(mean end / mean start)``: ``std(end / Ē − start / S̄, ddof=1) / √K``.

    >>> out = paired(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 5.0]))
    >>> round(out["change_se"], 6), round(out["start_se"], 6)
    (0.57735, 0.57735)
    """
    k = start.size
    root = math.sqrt(k)
    s_mean, e_mean = float(start.mean()), float(end.mean())
    out = {"start_se": float(start.std(ddof=1)) / root, "end_se": float(end.std(ddof=1)) / root,
           "change_se": float(np.std(end - start, ddof=1)) / root, "log_se": math.nan}
    if s_mean > 0 and e_mean > 0:
        out["log_se"] = float(np.std(end / e_mean - start / s_mean, ddof=1)) / root
    return out


def bootstrap(start: NDArray[np.float64], end: NDArray[np.float64], boot: int, seed: int
              ) -> dict[str, float]:
    """Bootstrap standard errors over K paired subsets: ``boot`` resamples of K subset
    indices drawn with replacement by ``np.random.default_rng(seed).integers(0, K, (boot,
    K))``; each resample gives the means at start and end, their change and ``ln`` ratio;
    the errors are those statistics' standard deviations (``ddof=1``) over resamples."""
    k = start.size
    idx = np.random.default_rng(seed).integers(0, k, size=(boot, k))
    s_mean, e_mean = start[idx].mean(axis=1), end[idx].mean(axis=1)
    out = {"start_se": float(s_mean.std(ddof=1)), "end_se": float(e_mean.std(ddof=1)),
           "change_se": float((e_mean - s_mean).std(ddof=1)), "log_se": math.nan}
    if np.all(s_mean > 0) and np.all(e_mean > 0):
        out["log_se"] = float(np.log(e_mean / s_mean).std(ddof=1))
    return out


def change(values: dict[str, np.ndarray], start_subsets: dict[int, float] | None = None,
           end_subsets: dict[int, float] | None = None, *, boot: int = 0, seed: int = 0
           ) -> dict[str, Any]:
    """Start, end, change and its standard error (NaN when there is none) for one series.

    ``start_subsets`` / ``end_subsets``: each subset's value at the first and last record
    (:func:`subset_values`); with the same K ≥ 2 subsets at both ends the errors are
    paired (or bootstrapped, ``boot`` > 0), else from the stored summaries' std.
    """
    v = values["value"]
    start, end = float(v[0]), float(v[-1])
    common = sorted(set(start_subsets or {}) & set(end_subsets or {}))
    se: dict[str, float] = {"start_se": math.nan, "end_se": math.nan,
                            "change_se": math.nan, "log_se": math.nan}
    source: str | None = None
    if len(common) >= 2 and start_subsets is not None and end_subsets is not None:
        s = np.asarray([start_subsets[i] for i in common], dtype=np.float64)
        e = np.asarray([end_subsets[i] for i in common], dtype=np.float64)
        if boot > 0:
            se = bootstrap(s, e, boot, seed)
            source = f"bootstrap over {len(common)} subsets ({boot} resamples, seed {seed})"
        else:
            se = paired(s, e)
            source = f"{len(common)} subsets, paired"
    else:
        se_start, se_end = _stderr(values, 0), _stderr(values, len(v) - 1)
        if math.isfinite(se_start) and math.isfinite(se_end):
            source = f"{int(values['count'][0])} subsets"
            se.update(start_se=se_start, end_se=se_end, change_se=math.hypot(se_start, se_end))
            if start > 0 and end > 0:
                se["log_se"] = math.hypot(se_start / start, se_end / end)
    out = {"start": start, "end": end, "change": end - start, "change_se": se["change_se"],
           "start_se": se["start_se"], "end_se": se["end_se"],
           "uncertainty": source, "first_step": int(values["step"][0]),
           "last_step": int(values["step"][-1]), "records": len(v)}
    out["log_se"] = se["log_se"]
    return out


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


def dynamics(records: Sequence[Record], probe_set: str, label: str | None
             ) -> dict[str, Any]:
    """Kernel motion and alignment of one group, from the agreed record variables.

    Keys (each ``None`` when its variable was not recorded): ``alignment_start`` /
    ``alignment_end`` (``target_alignment`` at the first and last record),
    ``distance_total`` (``kernel_distance_init`` at the last record: how far the kernel
    ended from where it began; the distances between successive records do not add up
    to it, ``1 − cos`` is no metric), ``fastest_step`` and ``fastest_velocity`` (the record of the largest
    ``kernel_velocity``), ``overlap_end`` (``eigenspace_overlap_init`` at the last
    record).
    """
    def one(variable: str) -> dict[str, np.ndarray] | None:
        s = series(records, probe_set, label, variable)
        ok = np.isfinite(s["value"])
        return {k: a[ok] for k, a in s.items()} if ok.any() else None

    out: dict[str, Any] = dict.fromkeys(
        ("alignment_start", "alignment_end", "distance_total", "fastest_step",
         "fastest_velocity", "overlap_end"))
    if (a := one("target_alignment")) is not None:
        out.update(alignment_start=float(a["value"][0]), alignment_end=float(a["value"][-1]))
    if (d := one("kernel_distance_init")) is not None:
        out["distance_total"] = float(d["value"][-1])
    if (vel := one("kernel_velocity")) is not None:
        i = int(np.argmax(vel["value"]))
        out.update(fastest_step=int(vel["step"][i]), fastest_velocity=float(vel["value"][i]))
    if (o := one("eigenspace_overlap_init")) is not None:
        out["overlap_end"] = float(o["value"][-1])
    return out


def summarize_group(records: Sequence[Record], probe_set: str, label: str | None, *,
                    boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """The report of one probe set (or class) of one run."""
    out: dict[str, Any] = {"probe_set": probe_set, "label": label, "variables": {}}
    having: dict[str, list[Record]] = {}  # the records holding each variable's summary
    for rec in records:
        for v in rec.values:
            if v.subset is None and v.probe_set == probe_set and v.label == label:
                having.setdefault(v.variable, []).append(rec)
    for var in variables_of(records, probe_set, label):
        s = series(records, probe_set, label, var)
        if s["value"].size == 0:
            continue
        first, last = having[var][0], having[var][-1]
        entry = change(s, subset_values(first, probe_set, label, var),
                       subset_values(last, probe_set, label, var), boot=boot, seed=seed)
        if var == "entropy":
            finite = np.where(np.isfinite(s["value"]), s["value"], np.inf)
            i = int(np.argmin(finite))
            entry.update(min=float(s["value"][i]), min_step=int(s["step"][i]),
                         end_minus_min=entry["end"] - float(s["value"][i]))
        if var in ("trace", "normalized_trace"):
            ok = entry["start"] > 0 and entry["end"] > 0
            factor = entry["end"] / entry["start"] if ok else math.nan
            entry.update(growth_factor=factor,
                         log_change=math.log(factor) if ok else math.nan,
                         log_change_se=entry["log_se"],
                         growth_factor_se=factor * entry["log_se"] if ok else math.nan)
        del entry["log_se"]
        out["variables"][var] = entry
    ent = out["variables"].get("entropy")
    if ent is not None:
        out["regime"] = regime(ent["change"], ent["change_se"])
        sig = abs(ent["change"]) / ent["change_se"] if ent["change_se"] > 0 else math.inf
        out["regime_sigmas"] = sig if math.isfinite(ent["change_se"]) else math.nan
    else:
        out["regime"] = None
        out["regime_sigmas"] = math.nan
    out["dynamics"] = dynamics(records, probe_set, label)
    return out


def summarize_run(store: RecordStore, info: RunInfo, *, boot: int = 0, seed: int = 0
                  ) -> dict[str, Any]:
    """The report of one run: metadata, cost, loss, and every probe set's changes."""
    records = store.records(info.id)
    return summarize_records(info, records, path=store.path, boot=boot, seed=seed)


def summarize_records(info: RunInfo, records: Sequence[Record], *, path: str = "",
                      boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """:func:`summarize_run` for records already read."""
    losses = [r.loss for r in records if r.loss is not None]
    return {
        "run_id": info.id, "run_name": info.name, "path": path,
        "source": info.source, "model_class": info.model_class, "framework": info.framework,
        "n_params": info.n_params, "kernel": info.kernel, "dtype": info.dtype,
        "finished": info.closed is not None, "records": len(records),
        "steps": [records[0].step, records[-1].step] if records else None,
        "loss": {"start": losses[0], "end": losses[-1]} if losses else None,
        "cost_seconds": cost_summary([r.seconds for r in records]),
        "probe_sets": [summarize_group(records, ps, lab, boot=boot, seed=seed)
                       for ps, lab in groups(records)],
    }


def summarize(store: RecordStore, run: int | str | None = None, *, boot: int = 0,
              seed: int = 0) -> list[dict[str, Any]]:
    """The report of every run in a store (or of one, by id or name).

    ``boot`` > 0 replaces the subsets' paired standard errors by a bootstrap over the
    subsets with that many resamples, drawn from ``np.random.default_rng(seed)``.
    """
    if boot < 0:
        raise InputError(f"expected boot= a non-negative integer, got {boot}")
    runs = store.runs() if run is None else [store.run(run)]
    return [summarize_run(store, info, boot=boot, seed=seed) for info in runs]
