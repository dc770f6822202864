"""The Recorder: collective variables of a model during training, one line per step.

Framework-neutral: the model goes through the same adapters and backends as
:func:`cvcore.measure`; the probe is fixed at construction and reused at every step;
each record lands in the record store in one transaction.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.api import execute
from cvcore.capabilities import framework_name, untouched
from cvcore.data_io import take
from cvcore.errors import CVCoreError, InputError, ModelError, describe, first_line
from cvcore.plan import PlanCache, Resolved
from cvcore.record.checks import (
    MAX_STEP,
    ZERO_DEFINED,
    _alive,
    check_loss,
    check_step,
    cost_summary,
    is_zero_kernel,
    loss_value,
    zero_kernel_note,
    zero_kernel_values,
)
from cvcore.record.dynamics_state import (
    DEFAULT_TOP_K,
    DYNAMICS_NOTE_KEY,
    DynamicsState,
    collect_arrays,
    summary_conventions,
)
from cvcore.record.probes import Part, UnionKernel, make_parts, probe_size, split_probe
from cvcore.record.store import Record, RecordStore, RunInfo, StoreError, Value
from cvcore.record.store_files import _plain
from cvcore.request import Compute, Options, option_names
from cvcore.spectrum import (
    SCALARS,
    collective_variables,
    diagonal_variables,
)
from cvcore.validate import measure_request

#: The scalar variables a record can hold (every CollectiveVariables field but the lists).
#: Subsets are measured as slices of one kernel on their union of samples (one backend
#: call instead of K) when ``union² × parameters`` is at most this many multiply-adds
#: and the union has at most :data:`UNION_MAX` samples; otherwise one call per subset.
UNION_FLOPS = 2e10
UNION_MAX = 4096
#: The extras key under which the Recorder notes what it could not measure.
NOTE_KEY = "cvcore_note"
#: The measure options a Recorder takes besides ``variables`` (every one of
#: :class:`cvcore.request.Options` but the family and the verification).
RECORDER_OPTIONS = tuple(n for n in option_names() if n not in ("family", "verify"))


def model_description(model: Any) -> str:
    """``module.QualName`` of the model's class; for a JAX ``(apply_fn or module, params)``
    pair, of its first item (a function's own name).

    >>> model_description(({}, None)), model_description((len, {}))
    ('builtins.dict', 'builtins.len')
    """
    if isinstance(model, tuple) and model:
        model = model[0]
        if callable(model) and hasattr(model, "__qualname__") and not isinstance(model, type):
            return f"{getattr(model, '__module__', None) or 'builtins'}.{model.__qualname__}"
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


class Recorder:
    """Records the collective variables of a model at chosen steps of its training.

    Args:
        probe: the probe inputs, fixed for the whole run: an array, a tensor, a dict or
            tuple of them (a model with several inputs), or named probe sets
            (``{"train": x_tr, "test": x_te}``, see :class:`ProbeSets`), each recorded
            under its name.
        every: record the steps that are multiples of ``every``; others are skipped.
        sink: a record store path ending in ``.db``; ``None`` keeps the records in memory
            (:attr:`store`) for this process only.
        subsets: ``(K, n)``: K random subsets of n samples, the same at every step; each
            subset's value and their mean and standard deviation are stored.
        labels: one label per probe sample (or a dict of them per probe set): one kernel
            per class.
        seed: seed of the subsets.
        name: the run's name in the store (default: the time it started).
        tags: the user's metadata for the run (JSON-serialisable values).
        resume: append to the latest run called ``name`` in ``sink`` instead of starting
            a new one.
        tensorboard: a log directory: every record's values also as TensorBoard scalars
            (:mod:`cvcore.integrations.tensorboard`).
        targets: the probe's targets (one array, a dict per probe set, or ``"labels"``
            for the ``labels=`` given): each record adds ``target_alignment``,
            ``residual_alignment`` and the ``residual_fractions`` array (r = f(x) - y).
        dynamics: ``True`` adds the kernel's motion to the previous and the first record
            (``kernel_distance``, ``kernel_velocity``, ``kernel_distance_init``,
            ``eigenspace_overlap``, ``eigenspace_overlap_init``) and the
            ``top_eigenvalues`` array; a list names exactly the dynamics variables wanted.
        top_k: eigenpairs for the eigenspace overlaps, ``top_eigenvalues`` and
            ``residual_fractions`` (clipped to each kernel's size).
        **measure_options: as for :func:`cvcore.measure`: ``variables``, ``kernel``,
            ``dtype``, ``implementation``, ``backend``, ``output``, ``device``, ``train``,
            ``memory_budget``.

    Raises:
        InputError: a bad option (``every < 1``, subsets larger than the probe, labels of
            the wrong length, ...), before anything is written.
        StoreError: ``sink`` is not a record store, is locked, or has a newer schema.

    Example (inside any training loop)::

        with cvcore.Recorder({"train": x_tr, "test": x_te}, sink="run.db",
                             subsets=(20, 10), variables=["entropy", "trace"]) as rec:
            for epoch in range(epochs):
                rec.record(epoch, model, loss=loss)
                ...  # one epoch of training
    """

    def __init__(self, probe: Any, *, every: int = 1, sink: str | Path | None = None,
                 subsets: tuple[int, int] | None = None, labels: Any = None, seed: int = 0,
                 name: str | None = None, tags: Mapping[str, Any] | None = None,
                 resume: bool = False, tensorboard: str | Path | None = None,
                 targets: Any = None, dynamics: bool | Sequence[str] = False,
                 top_k: int = DEFAULT_TOP_K, **measure_options: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise InputError(f"expected every= a positive integer, got {every!r}")
        self.every = int(every)
        options = dict(measure_options)
        variables = options.pop("variables", None)
        unknown = sorted(set(options) - set(RECORDER_OPTIONS))
        if unknown:
            raise InputError(f"expected measure options among variables, "
                             f"{', '.join(RECORDER_OPTIONS)}; got {unknown}")
        #: the one request every step measures (validated here, once)
        self.measure_request = measure_request(Options(**options), variables=variables)
        self.variables = self.measure_request.variables
        self.backend: str | None = self.measure_request.backend
        self.request = self.measure_request.kernel
        self._plans = PlanCache()
        self.sets = split_probe(probe)
        self.parts = make_parts(self.sets, subsets=subsets, labels=labels, seed=seed)
        self.subsets = None if subsets is None else tuple(int(v) for v in subsets)
        if tags is not None and not isinstance(tags, Mapping):
            raise InputError(f"expected tags= a dict, got {describe(tags)}")
        self._diagonal = self.measure_request.compute is Compute.DIAGONAL
        self._dyn = DynamicsState.build(dynamics, targets=targets, labels=labels, top_k=top_k,
                                        kernel=self.request.kernel, sets=self.sets,
                                        parts=self.parts)
        #: the kernel-dynamics variables each record adds (none unless asked)
        self.dynamics, self.top_k = self._dyn.names, self._dyn.top_k
        #: what each step executes: the measure request, forming the kernel when the
        #: dynamics need it and the variables alone would not
        self._execute = replace(self.measure_request, variables=None) \
            if self.dynamics and self._diagonal else self.measure_request
        self._covariance = self.measure_request.covariance
        self._names = SCALARS if self.variables is None else tuple(self.variables)
        self._described = False
        self._closed = False
        self._union_choice: dict[str, bool] = {}
        self._notes: list[str] = []
        self._warned = False
        if sink is not None and not str(sink).endswith(".db"):
            raise StoreError(f"expected sink= a path ending in .db, got {str(sink)!r}")
        self._tensorboard: Any = None
        if tensorboard is not None:
            from cvcore.integrations.tensorboard import ScalarWriter

            self._tensorboard = ScalarWriter(tensorboard)
        self.store = RecordStore(":memory:" if sink is None else sink)
        self.sink = None if sink is None else Path(sink)
        probe_info = self._probe_info(labels)
        run_name = name or time.strftime("run %Y-%m-%d %H:%M:%S")
        try:
            self.run_id = self._open_run(run_name, resume, probe_info, dict(tags or {}),
                                         seed)
        except BaseException:
            self.store.close()
            raise
        self.name = run_name

    def _probe_info(self, labels: Any) -> dict[str, Any]:
        info: dict[str, Any] = {}
        for name, inputs in self.sets.items():
            classes = sorted({p.label for p in self.parts if p.probe_set == name and p.label})
            info[name] = {"n_samples": probe_size(inputs),
                          "subsets": list(self.subsets) if self.subsets else None,
                          "classes": classes or None}
        return info

    def _open_run(self, name: str, resume: bool, probe_info: dict[str, Any],
                  tags: dict[str, Any], seed: int) -> int:
        from cvcore import __version__

        options = {"variables": list(self._names), "every": self.every, "seed": seed,
                   "implementation": self.request.implementation.value,
                   "backend": self.backend, "device": self.request.device,
                   "train": self.request.train,
                   "output": self.request.output if isinstance(self.request.output, (int, str))
                   else None if self.request.output is None else repr(self.request.output)}
        if self.dynamics:  # only then: a run without dynamics keeps its options as they were
            options.update(dynamics=list(self.dynamics), top_k=self.top_k, targets={
                n: "labels" if t.labels else "values" for n, t in self._dyn.targets.items()})
        if resume:
            old = self.store.find_run(name)
            if old is not None:
                self._check_resume(old, probe_info)
                self.store.reopen_run(old.id)
                self._dyn.resumed = True
                self._described = old.model_class is not None
                return old.id
        return self.store.create_run(name=name, source="recorder", kernel=self.request.kernel,
                                     dtype=self.request.dtype, cvcore_version=__version__,
                                     probe_sets=probe_info, options=options, tags=tags)

    def _check_resume(self, old: RunInfo, probe_info: dict[str, Any]) -> None:
        if old.closed is None and old.host == socket.gethostname() and old.pid \
                and old.pid != os.getpid() and _alive(old.pid):
            raise StoreError(f"run {old.name!r} in {self.store.path} is being written by "
                             f"process {old.pid}; expected a finished or interrupted run")
        mine = {"kernel": self.request.kernel, "dtype": self.request.dtype,
                "probe_sets": probe_info}
        theirs = {"kernel": old.kernel, "dtype": old.dtype, "probe_sets": old.probe_sets}
        if mine != theirs:
            raise StoreError(f"expected to resume run {old.name!r} with the same probe sets, "
                             f"kernel and dtype {theirs}, got {mine}")

    # -- recording -------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether ``record(step, ...)`` measures (``step`` a multiple of ``every``)."""
        return int(step) % self.every == 0

    def record(self, step: int, model: Any, loss: Any = None, **extra: Any) -> Record | None:
        """Measure ``model`` on the probe and store one record for ``step``.

        Training is not changed: random states (Python, NumPy, torch) are restored,
        train/eval flags and ``.grad`` are put back, and no parameter or buffer is written.

        A zero kernel (a model whose outputs do not depend on its parameters on the
        probe) is recorded, not refused: trace 0, the variables it leaves undefined
        (entropies, effective rank, magnitude variance) as missing, a note under
        ``extras["cvcore_note"]``, and one ``RuntimeWarning`` per Recorder.

        Args:
            step: the training step or epoch (an integer from 0 to 2^63 - 1).
            model: the model as it is now (any framework a backend accepts).
            loss: the current training loss (a number or a one-element tensor), stored with
                the record; a NaN loss is recorded as missing.
            **extra: more JSON-serialisable numbers to keep with the record (accuracy,
                learning rate, ...).

        Returns:
            The :class:`Record` stored, or ``None`` when ``every`` skips this step.

        Raises:
            InputError: a step that is not an integer in range, a loss that is not one
                number, or extras that are not JSON; before anything is measured or written.
        """
        if self._closed:
            raise InputError("expected an open Recorder, got one already closed")
        step = check_step(step)
        check_loss(loss)
        for key in (NOTE_KEY, DYNAMICS_NOTE_KEY):
            if key in extra:
                raise InputError(f"expected extras other than {key!r} (the Recorder's own "
                                 "notes), got it")
        if not self.due(step):
            return None
        loss_number = loss_value(loss)
        extras = _plain(extra)
        started = time.perf_counter()
        self._notes = []
        self._dyn.begin(model, step)
        try:
            with untouched(model):
                values, description = self._measure(model)
            arrays = collect_arrays(self._dyn.pending)
        finally:
            self._dyn.end()
        seconds = time.perf_counter() - started
        if self._dyn.notes:
            extras[DYNAMICS_NOTE_KEY] = "; ".join(self._dyn.notes)
        if self._notes:
            extras[NOTE_KEY] = zero_kernel_note(self._notes)
            if not self._warned:
                self._warned = True
                warnings.warn(f"cvcore: step {step}: {extras[NOTE_KEY]} (recorded; this "
                              "warning is given once per Recorder)", RuntimeWarning, stacklevel=2)
        record = Record(step=step, values=tuple(values), loss=loss_number,
                        extras=extras, seconds=seconds, time=time.time(), arrays=arrays)
        self.store.add_record(self.run_id, record, model=description)
        if self._tensorboard is not None:
            self._tensorboard.write(record)
        return record

    def _measure(self, model: Any) -> tuple[list[Value], dict[str, Any] | None]:
        values: list[Value] = []
        description: dict[str, Any] | None = None
        groups: dict[str, list[dict[str, float]]] = {}
        unions: dict[str, UnionKernel] = {}
        for part in self.parts:
            try:
                if part.index is not None and self._union(model, part.probe_set):
                    if part.probe_set not in unions:
                        unions[part.probe_set] = self._union_kernel(model, part.probe_set)
                    numbers, used, n_params = self._slice(unions[part.probe_set], part)
                else:
                    numbers, used, n_params = self._measure_part(model, part)
            except CVCoreError:
                raise
            except Exception as exc:  # the framework's own error for a probe that does not fit
                raise ModelError(f"expected probe set {part.probe_set!r} to fit the model, "
                                 f"got {type(exc).__name__}: {first_line(exc, empty='')}") from exc
            if not self._described and description is None:
                description = {"model_class": model_description(model),
                               "framework": framework_name(model, used),
                               "n_params": n_params if n_params is not None
                               else self._plans.count(model, part.probe_set)}
            for var, val in numbers.items():
                values.append(Value(part.probe_set, var, val, subset=part.subset,
                                    label=part.label))
            dyn = self._dyn.done.pop((part.probe_set, part.subset, part.label), None)
            if dyn is not None:
                values.extend(Value(part.probe_set, var, val, subset=part.subset,
                                    label=part.label, convention=dyn.conventions[var])
                              for var, val in dyn.scalars.items())
                self._dyn.pending.append((part, dyn))
            if part.subset is not None:
                groups.setdefault(part.probe_set, []).append(
                    numbers if dyn is None else {**numbers, **dyn.scalars})
        for probe_set, rows in groups.items():
            conventions = summary_conventions(self._dyn.pending, probe_set)
            for var in (*self._names, *(v for v in self.dynamics if v in rows[0])):
                column = np.asarray([r[var] for r in rows], dtype=np.float64)
                std = float(np.std(column, ddof=1)) if column.size > 1 else None
                values.append(Value(probe_set, var, float(np.mean(column)), std=std,
                                    count=int(column.size), convention=conventions.get(var)))
        if description is not None:
            self._described = True
        return values, description

    def _union_index(self, probe_set: str) -> NDArray[np.int64]:
        chosen = [p.index for p in self.parts if p.probe_set == probe_set and p.index is not None]
        return np.unique(np.concatenate(chosen)).astype(np.int64)

    def _union(self, model: Any, probe_set: str) -> bool:
        """Whether this probe set's subsets are cheaper as slices of one union kernel
        (never in train mode, where the samples of a batch interact)."""
        if self.request.train:
            return False
        if probe_set not in self._union_choice:
            size = self._union_index(probe_set).size
            self._resolve(model, self.sets[probe_set], probe_set)  # the plan tells P
            params = self._plans.count(model, probe_set)
            self._union_choice[probe_set] = params is not None and size <= UNION_MAX and \
                float(size) ** 2 * params <= UNION_FLOPS
        return self._union_choice[probe_set]

    def _union_kernel(self, model: Any, probe_set: str) -> UnionKernel:
        """The kernel (or diagonal) on the union of a set's subsets, and where each
        subset's samples sit in it."""
        union = self._union_index(probe_set)
        resolved = self._resolve(model, self.sets[probe_set], probe_set, union)
        positions = {p.subset: np.searchsorted(union, p.index) for p in self.parts
                     if p.probe_set == probe_set and p.index is not None and p.subset is not None}
        done = execute(resolved, self._execute)
        if done.diagonal is not None:
            return UnionKernel(done.diagonal, done.backend, None, positions, int(union.size))
        assert done.result is not None
        return UnionKernel(np.asarray(done.result.kernel), done.backend,
                           done.result.n_params, positions, int(union.size))

    def _resolve(self, model: Any, inputs: Any, probe_set: str,
                 index: NDArray[np.int64] | None = None) -> Resolved:
        """One call on ``inputs`` (their rows ``index``), with this probe set's cached plan."""
        if index is not None:  # the plan is cached by then (:meth:`_union` made it)
            inputs = take(inputs, index, self._plans.backend(model, probe_set))
        return self._plans.bind(model, inputs, self.request, self.backend, probe_set)

    def _slice(self, union: UnionKernel, part: Part) -> tuple[dict[str, float], str, int | None]:
        matrix, used, n_params = union.matrix, union.backend, union.n_params
        assert part.subset is not None
        pos = union.positions[part.subset]
        per = matrix.shape[0] // union.n_samples  # O rows per sample in a full kernel
        rows = (pos[:, None] * per + np.arange(per)).reshape(-1)  # row i·O + o
        piece = matrix[rows] if matrix.ndim == 1 else matrix[np.ix_(rows, rows)]
        return self._variables(piece, part), used, n_params

    def _variables(self, kernel: Any, part: Part) -> dict[str, float]:
        """The asked variables of one kernel (or diagonal); a zero kernel gives trace 0
        and NaN for the variables it leaves undefined, with a note for the record. The
        kernel dynamics of a 2-D kernel are computed here too, when asked for."""
        if self.dynamics and np.ndim(kernel) == 2:
            self._dyn.measure(part, np.asarray(kernel), self._outputs, self.request.train)
        if self._diagonal and np.ndim(kernel) == 2:  # formed for the dynamics only
            kernel = np.diagonal(kernel)
        if is_zero_kernel(kernel):
            where = f"probe set {part.probe_set!r}" + (
                "" if part.subset is None else f" subset {part.subset}") + (
                "" if part.label is None else f" class {part.label!r}")
            self._notes.append(where)
            return zero_kernel_values(self._names)
        if self._diagonal:
            dv = diagonal_variables(kernel).to_dict()
            return {v: float(dv[v]) for v in self._names}
        cv = collective_variables(kernel, covariance=self._covariance)
        return {v: float(getattr(cv, v)) for v in self._names}

    def _measure_part(self, model: Any, part: Part
                      ) -> tuple[dict[str, float], str, int | None]:
        done = execute(self._resolve(model, part.inputs, part.probe_set), self._execute)
        if done.diagonal is not None:
            return self._variables(done.diagonal, part), done.backend, None
        assert done.result is not None
        return (self._variables(done.result.kernel, part), done.backend,
                done.result.n_params)

    def _outputs(self, part: Part) -> tuple[Any, Any, Any, Any]:
        """What the model's outputs on a part's samples are computed from, (backend,
        model, inputs, request): in eval mode the whole probe set (one forward pass per
        record, rows taken from it), under ``train=True`` the part's own batch."""
        inputs = part.inputs if self.request.train else self.sets[part.probe_set]
        assert self._dyn.model is not None
        r = self._resolve(self._dyn.model, inputs, part.probe_set)
        return r.backend, r.model, r.inputs, r.request

    # -- lifetime --------------------------------------------------------------------

    def records(self) -> list[Record]:
        """Every record of this run so far (read back from the store)."""
        return self.store.records(self.run_id)

    def cost(self) -> dict[str, float]:
        """Seconds per record: count, total, mean, median and max; with kernel dynamics,
        also ``dynamics_bytes``: the memory the kept kernels and eigenvectors take now."""
        out = cost_summary([r.seconds for r in self.records()])
        if self.dynamics:
            out["dynamics_bytes"] = float(self._dyn.nbytes())
        return out

    def close(self) -> None:
        """Mark the run finished and close the store (records are already safe)."""
        if self._closed:
            return
        self._closed = True
        if self._tensorboard is not None:
            self._tensorboard.close()
        try:
            self.store.close_run(self.run_id)
        finally:
            if self.sink is not None:
                self.store.close()

    def __enter__(self) -> Recorder:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MAX_STEP", "NOTE_KEY", "RECORDER_OPTIONS", "SCALARS", "UNION_FLOPS", "UNION_MAX",
           "ZERO_DEFINED", "Recorder", "check_loss", "check_step", "cost_summary",
           "is_zero_kernel", "loss_value", "model_description", "zero_kernel_note",
           "zero_kernel_values"]
