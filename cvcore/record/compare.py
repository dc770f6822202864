"""Comparing recorded runs: each run's change with its uncertainty, seeds pooled, and the
differences between runs with theirs.

What ``cv compare`` prints, computed here on NumPy. Conventions (``docs/recording.md``,
``cv compare``):

* runs that differ only in their seed (the same model class, parameter count, framework,
  kernel, dtype, probe sets, options and tags once ``seed`` is left out; the name is not
  compared) form one *group*; a group of n ≥ 2 seeds reports the mean change over seeds
  with the standard error ``std(ddof=1) / √n`` of the seeds' changes (what training and
  probe randomness together make of it); a group of one run keeps that run's own
  uncertainty (its subsets, :mod:`cvcore.record.summary`), or none;
* the difference between two groups is ``change(B) − change(A)``, A the first group
  given (the reference), with the standard error ``√(se_A² + se_B²)`` (independent runs);
  without an uncertainty on either side it has none.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.record.store import Record, RecordStore, RunInfo
from cvcore.record.summary import NOISE_SIGMAS, regime, summarize_records

SEED = "seed"


@dataclass(frozen=True)
class LoadedRun:
    """One run read from a store: where it came from, its metadata and records."""

    path: str
    info: RunInfo
    records: Sequence[Record]


@dataclass
class RunGroup:
    """Runs that differ only in their seed."""

    label: str
    runs: list[LoadedRun] = field(default_factory=list)

    @property
    def seeds(self) -> list[Any]:
        return [seed_of(r.info) for r in self.runs]


def seed_of(info: RunInfo) -> Any:
    """A run's seed: its ``seed`` tag, else the ``seed`` of its options (``None``)."""
    if SEED in info.tags:
        return info.tags[SEED]
    return info.options.get(SEED)


def description(info: RunInfo) -> dict[str, Any]:
    """What makes two runs the same experiment: everything but the name, the seed and
    the bookkeeping (ids, times, host, version)."""
    return {"model_class": info.model_class, "n_params": info.n_params,
            "framework": info.framework, "kernel": info.kernel, "dtype": info.dtype,
            "source": info.source, "probe_sets": info.probe_sets,
            "options": {k: v for k, v in info.options.items() if k != SEED},
            "tags": {k: v for k, v in info.tags.items() if k != SEED}}


def _key(info: RunInfo) -> str:
    return json.dumps(description(info), sort_keys=True, default=str)


def group_runs(runs: Sequence[LoadedRun]) -> list[RunGroup]:
    """Runs pooled into groups that differ only in their seed, in first-seen order.

    Runs with the same description and the same seed are not pooled (they are repeats,
    not seeds): each stays a group of its own. A group's label names what sets it apart
    from the others (``width=64``), else its first run's name.
    """
    by_key: dict[str, list[LoadedRun]] = {}
    for run in runs:
        by_key.setdefault(_key(run.info), []).append(run)
    out: list[RunGroup] = []
    for members in by_key.values():
        seeds = [repr(seed_of(r.info)) for r in members]
        if len(set(seeds)) == len(seeds) and seed_of(members[0].info) is not None:
            out.append(RunGroup("", list(members)))
        else:
            out.extend(RunGroup("", [r]) for r in members)
    _label(out)
    return out


def _varying(dicts: list[dict[str, Any]]) -> list[str]:
    """Keys every dict sets (not to ``None``) whose values are not all the same."""
    keys = sorted(k for k in {k for d in dicts for k in d}
                  if all(d.get(k) is not None for d in dicts))
    return [k for k in keys if len({json.dumps(d.get(k), sort_keys=True, default=str)
                                    for d in dicts}) > 1]


def _label(groups: list[RunGroup]) -> None:
    """Name each group by the user's tags that differ between groups (``width=64``), else
    by the model's size, class, kernel or dtype where those differ, else (or when more
    than three keys differ) by its run's name."""
    descs = [description(g.runs[0].info) for g in groups]
    tags = [d["tags"] for d in descs]
    meta = [{k: d[k] for k in ("n_params", "model_class", "kernel", "dtype")} for d in descs]
    varying, source = _varying(tags), tags
    if not varying:
        varying, source = _varying(meta), meta
    for g, f in zip(groups, source):
        names = sorted({r.info.name for r in g.runs})
        label = ", ".join(f"{k}={f.get(k)}" for k in varying) if 0 < len(varying) <= 3 \
            else (names[0] if len(names) == 1 else f"{names[0]} ...")
        if len(g.runs) > 1:
            label += f" ({len(g.runs)} seeds)"
        g.label = label
    seen: dict[str, int] = {}
    for g in groups:  # identical labels (repeats): number them
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label += f" #{seen[g.label]}"


def load_runs(stores: Sequence[str | Path], run: int | str | None = None
              ) -> list[LoadedRun]:
    """Every run (or the one called ``run``) of each store, with its records."""
    out: list[LoadedRun] = []
    for path in stores:
        with RecordStore(path, create=False) as store:
            infos = store.runs() if run is None else [store.run(run)]
            out.extend(LoadedRun(str(path), info, store.records(info.id)) for info in infos)
    return out


def _pooled(entries: list[dict[str, Any]], key: str, se_key: str) -> dict[str, Any]:
    """Mean over seeds with its standard error; one run keeps its own error."""
    values = np.asarray([e[key] for e in entries], dtype=np.float64)
    if len(entries) == 1:
        e = entries[0]
        return {"value": float(values[0]), "se": e.get(se_key, math.nan),
                "uncertainty": e.get("uncertainty"), "n": 1}
    ok = values[np.isfinite(values)]
    se = float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan
    return {"value": float(ok.mean()) if ok.size else math.nan, "se": se,
            "uncertainty": f"{ok.size} seeds", "n": int(ok.size),
            "per_seed": [float(v) for v in values]}


def group_changes(group: RunGroup, *, boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Per probe set and variable, the group's change (and, for the trace, Δ ln Tr)."""
    summaries = [summarize_records(r.info, r.records, path=r.path, boot=boot, seed=seed)
                 for r in group.runs]
    out: dict[str, dict[str, Any]] = {}
    for s in summaries:
        for g in s["probe_sets"]:
            where = g["probe_set"] + (f" class {g['label']}" if g["label"] else "")
            for var, e in g["variables"].items():
                out.setdefault(where, {}).setdefault(var, []).append(e)
    changes: dict[str, Any] = {}
    for where, variables in out.items():
        changes[where] = {}
        for var, entries in variables.items():
            if len(entries) < len(group.runs):
                continue  # not recorded in every seed: not pooled
            item = {"start": _pooled(entries, "start", "start_se"),
                    "end": _pooled(entries, "end", "end_se"),
                    "change": _pooled(entries, "change", "change_se")}
            if "log_change" in entries[0]:
                item["log_change"] = _pooled(entries, "log_change", "log_change_se")
            changes[where][var] = item
    return {"label": group.label, "runs": [{"path": r.path, "run_id": r.info.id,
                                             "run_name": r.info.name,
                                             "seed": seed_of(r.info)} for r in group.runs],
            "n_params": group.runs[0].info.n_params,
            "n_samples": {ps: d.get("n_samples") for ps, d in
                          group.runs[0].info.probe_sets.items() if isinstance(d, dict)},
            "changes": changes}


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b − a`` of two pooled changes with ``√(se_a² + se_b²)`` (NaN when either has
    none), and how many standard errors apart they are.

    >>> d = difference({"value": 1.0, "se": 0.3}, {"value": 2.0, "se": 0.4})
    >>> round(d["value"], 6), round(d["se"], 6), round(d["sigmas"], 6)
    (1.0, 0.5, 2.0)
    """
    value = b["value"] - a["value"]
    se = math.hypot(a["se"], b["se"]) if (math.isfinite(a["se"]) and
                                           math.isfinite(b["se"])) else math.nan
    sigmas = abs(value) / se if math.isfinite(se) and se > 0 else math.nan
    verdict = ("no uncertainty" if not math.isfinite(se) else
               "within noise" if abs(value) < NOISE_SIGMAS * se else "different")
    return {"value": value, "se": se, "sigmas": sigmas, "verdict": verdict}


def compare_runs(runs: Sequence[LoadedRun], *, boot: int = 0, seed: int = 0
                 ) -> dict[str, Any]:
    """Groups (seeds pooled), each group's changes, and each group's difference from the
    first (the reference), per probe set and variable.

    Raises:
        InputError: no runs with records.
    """
    runs = [r for r in runs if r.records]
    if not runs:
        raise InputError("expected runs with records to compare, got none")
    groups = [group_changes(g, boot=boot, seed=seed) for g in group_runs(runs)]
    ref = groups[0]
    for g in groups:
        for where, variables in g["changes"].items():
            for var, item in variables.items():
                ent = var == "entropy"
                if ent:
                    item["regime"] = regime(item["change"]["value"], item["change"]["se"])
                if g is ref:
                    continue
                other = ref["changes"].get(where, {}).get(var)
                if other is None:
                    continue
                item["difference"] = {k: difference(other[k], item[k])
                                      for k in ("change", "log_change") if k in item}
    sizes = {json.dumps(g["n_samples"], sort_keys=True) for g in groups}
    return {"reference": ref["label"], "groups": groups,
            "probe_sizes_differ": len(sizes) > 1}


__all__ = ["LoadedRun", "RunGroup", "compare_runs", "description", "difference",
           "group_runs", "load_runs", "seed_of"]
