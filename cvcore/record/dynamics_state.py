"""The kernel dynamics a Recorder records: how each kernel lines up with the targets and
how it moved since the previous and the first record.

The math is :mod:`cvcore.dynamics`; this module decides what is asked, keeps the previous
and the first kernel of each measured part (only what the asked variables need), and turns
one record's kernels into values, arrays and their conventions. Nothing here imports a
framework: the Recorder hands in NumPy kernels and model outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.capabilities import model_outputs
from cvcore.dynamics import (
    Eigenpairs,
    as_kernel,
    kernel_distance,
    residual,
    residual_alignment,
    subspace_overlap,
    target_alignment,
    top_eigenpairs,
)
from cvcore.errors import InputError, ModelError, describe, first_line
from cvcore.record.probes import Part, _as_labels, _label_text, probe_size
from cvcore.record.schema import ArrayValue
from cvcore.request import Targets
from cvcore.validate import check_targets

#: Values that need targets (``targets=``): scalars, then the residual's cumulative curve.
TARGET_VARIABLES = ("target_alignment", "residual_alignment", "residual_fractions")
#: Values that compare a kernel with the previous and the first record's.
MOTION_VARIABLES = ("kernel_distance", "kernel_velocity", "kernel_distance_init",
                    "eigenspace_overlap", "eigenspace_overlap_init", "top_eigenvalues")
#: Every kernel-dynamics variable a Recorder can record (``dynamics=`` takes a subset).
DYNAMICS_VARIABLES = TARGET_VARIABLES + MOTION_VARIABLES
#: The variables that need the kernel's top eigenpairs (one decomposition per kernel).
EIGEN_VARIABLES = frozenset({"residual_alignment", "residual_fractions", "eigenspace_overlap",
                             "eigenspace_overlap_init", "top_eigenvalues"})
#: The dynamics variables stored as arrays (schema 2's ``arrays`` table).
ARRAY_VARIABLES = ("top_eigenvalues", "residual_fractions")
#: How many top eigenpairs (eigenvalues, eigenspace, residual fractions) by default.
DEFAULT_TOP_K = 10
#: The extras key under which a record notes what its kernel dynamics could not measure.
DYNAMICS_NOTE_KEY = "cvcore_dynamics_note"

Key = tuple[str, "int | None", "str | None"]  # (probe set, subset, label)


def dynamics_variables(dynamics: Any, has_targets: bool) -> tuple[str, ...]:
    """The dynamics variables a Recorder computes, from its ``dynamics=`` and whether it was
    given targets: ``False`` → the target ones when there are targets, else none; ``True``
    → every motion variable, and the target ones when there are targets; a list → exactly
    those (the target ones need targets).

    >>> dynamics_variables(False, False), dynamics_variables(False, True)[0]
    ((), 'target_alignment')
    >>> dynamics_variables(["kernel_distance"], False)
    ('kernel_distance',)
    """
    if isinstance(dynamics, (bool, np.bool_)):
        if not dynamics:
            return TARGET_VARIABLES if has_targets else ()
        return DYNAMICS_VARIABLES if has_targets else MOTION_VARIABLES
    if isinstance(dynamics, str) or not isinstance(dynamics, Sequence) or not dynamics:
        raise InputError(f"expected dynamics= True, False or a list of names among "
                         f"{', '.join(DYNAMICS_VARIABLES)}; got {describe(dynamics)}")
    unknown = [d for d in dynamics if d not in DYNAMICS_VARIABLES]
    if unknown:
        raise InputError(f"expected dynamics= names among {', '.join(DYNAMICS_VARIABLES)}; "
                         f"got {unknown}")
    needing = [d for d in dynamics if d in TARGET_VARIABLES]
    if needing and not has_targets:
        raise InputError(f"expected targets= for dynamics {needing}, got no targets")
    return tuple(d for d in DYNAMICS_VARIABLES if d in dynamics)


def check_top_k(top_k: Any) -> int:
    """``top_k=`` as a positive integer (clipped to each kernel's size when used)."""
    if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)) \
            or top_k < 1:
        raise InputError(f"expected top_k= a positive integer, got {top_k!r}")
    return int(top_k)


def probe_targets(targets: Any, sets: Mapping[str, int], labels: Any) -> dict[str, Targets]:
    """The targets of each probe set, checked once (:func:`cvcore.validate.check_targets`).

    Args:
        targets: one array (a single probe set), a dict keyed by probe set (some may be
            left out), or ``"labels"``: the ``labels=`` of class-wise kernels, as class
            targets.
        sets: each probe set's number of samples.
        labels: the Recorder's ``labels=`` (for ``"labels"``).
    """
    if targets is None:
        return {}
    if isinstance(targets, str):
        if targets != "labels":
            raise InputError(f"expected targets= an array, a dict per probe set or 'labels', "
                             f"got {targets!r}")
        if labels is None:
            raise InputError("expected labels= with targets='labels', got no labels")
        targets = labels
    if not isinstance(targets, Mapping):
        if len(sets) != 1:
            raise InputError(f"expected targets= as a dict keyed by probe set {sorted(sets)}, "
                             f"got {describe(targets)}")
        targets = {next(iter(sets)): targets}
    unknown = sorted(str(k) for k in set(targets) - set(sets))
    if unknown:
        raise InputError(f"expected targets for probe sets among {sorted(sets)}, got targets "
                         f"for {unknown}")
    out: dict[str, Targets] = {}
    for name, value in targets.items():
        try:
            out[name] = check_targets(value, sets[name])
        except InputError as exc:
            raise InputError(f"probe set {name!r}: {exc}") from None
    return out


def targets_text(t: Targets) -> str:
    return "one-hot class targets" if t.labels else "real targets"


@dataclass
class Memory:
    """What is kept of one part's kernel between records (only what is asked for)."""

    step: int
    #: the whole kernel (for the kernel distance: ⟨K_s, K_t⟩_F needs all of it)
    kernel: NDArray[np.float64] | None = None
    #: the top-k eigenvectors, D × k (for the eigenspace overlap); None for a zero kernel
    basis: NDArray[np.float64] | None = None
    #: the note to give when this memory is compared (e.g. after a resume)
    origin: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.kernel, self.basis) if a is not None)


@dataclass
class PartDynamics:
    """One part's dynamics at one record: scalars, arrays, and their conventions."""

    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    conventions: dict[str, str] = field(default_factory=dict)


class DynamicsState:
    """The previous and first kernel of every part, and one record's dynamics.

    Args:
        names: the dynamics variables to compute (:func:`dynamics_variables`).
        top_k: eigenpairs kept and reported (clipped to each kernel's size).
        kernel: the run's kernel convention (``"traced"`` or ``"full"``).
        targets: per probe set, its checked targets.
        resumed: the run was resumed: its earlier kernels are not in memory.
    """

    def __init__(self, names: Sequence[str], top_k: int, kernel: str,
                 targets: Mapping[str, Targets], *, resumed: bool = False) -> None:
        self.names = tuple(names)
        self.top_k = top_k
        self.layout = "traced" if kernel == "traced" else "full"
        self.kernel_text = "traced kernel (mean over outputs)" if kernel == "traced" \
            else "full kernel (sample-major)"
        self.targets = dict(targets)
        self.resumed = resumed
        self._keep_kernel = bool({"kernel_distance", "kernel_velocity"} & set(names))
        self._keep_kernel_init = "kernel_distance_init" in names
        self._keep_basis = "eigenspace_overlap" in names
        self._keep_basis_init = "eigenspace_overlap_init" in names
        self.previous: dict[Key, Memory] = {}
        self.initial: dict[Key, Memory] = {}
        #: each part's samples in its probe set (:func:`part_rows`)
        self.rows: dict[Key, NDArray[np.int64] | None] = {}
        # one record's: its model and step, notes, outputs per probe set (or part), the
        # parts measured and not yet taken, and those taken (for the arrays)
        self.model: Any = None
        self.step = 0
        self.notes: list[str] = []
        self.outputs: dict[Key | str, NDArray[np.float64] | None] = {}
        self.done: dict[Key, PartDynamics] = {}
        self.pending: list[tuple[Part, PartDynamics]] = []

    @classmethod
    def build(cls, dynamics: Any, *, targets: Any, labels: Any, top_k: Any, kernel: str,
              sets: Mapping[str, Any], parts: Sequence[Part]) -> DynamicsState:
        """A Recorder's dynamics from its options, every one checked (one-line
        :class:`InputError`) before anything is written."""
        checked = probe_targets(targets, {n: probe_size(x) for n, x in sets.items()}, labels)
        state = cls(dynamics_variables(dynamics, bool(checked)), check_top_k(top_k), kernel,
                    checked)
        if checked:
            state.rows = part_rows(parts, labels)
        return state

    @property
    def active(self) -> bool:
        return bool(self.names)

    def needs_outputs(self, probe_set: str) -> bool:
        """Whether this probe set's records need the model's outputs (a residual)."""
        return probe_set in self.targets and bool(
            {"residual_alignment", "residual_fractions"} & set(self.names))

    def nbytes(self) -> int:
        """Bytes held between records: the kept kernels and eigenvector bases."""
        return sum(m.nbytes for d in (self.previous, self.initial) for m in d.values())

    def begin(self, model: Any, step: int) -> None:
        """Start a record of ``model`` at ``step``."""
        self.model, self.step = model, step
        self.notes, self.outputs, self.done, self.pending = [], {}, {}, []

    def end(self) -> None:
        """End a record (the model is not kept)."""
        self.model, self.outputs, self.done, self.pending = None, {}, {}, []

    def measure(self, part: Part, kernel: NDArray[Any],
                source: Callable[[Part], tuple[Any, Any, Any, Any]], own_batch: bool) -> None:
        """One part's dynamics at the current record, kept in :attr:`done` for the
        Recorder to take. ``source(part)`` gives (backend, model, inputs, request) for the
        model's outputs when a residual is asked for: on the whole probe set, or with
        ``own_batch`` (``train=True``, where the samples of a batch interact) on the part's
        own samples."""
        key = (part.probe_set, part.subset, part.label)
        rows = self.rows.get(key)
        outputs = self._outputs(part, rows, source, own_batch) \
            if self.needs_outputs(part.probe_set) else None
        self.done[key] = self.part(key, self.step, kernel, rows, outputs)

    def _outputs(self, part: Part, rows: NDArray[np.int64] | None,
                 source: Callable[[Part], tuple[Any, Any, Any, Any]], own_batch: bool
                 ) -> NDArray[np.float64] | None:
        """The outputs on a part's samples: one forward pass per probe set and record, the
        part's rows taken from it, or the part's own batch. Outputs that are not finite
        give ``None``: residual values missing, with a note."""
        whole = not own_batch or part.subset is None and part.label is None
        cache: Key | str = part.probe_set if whole else (part.probe_set, part.subset,
                                                         part.label)
        if cache not in self.outputs:
            backend, model, inputs, request = source(part)
            try:
                self.outputs[cache] = model_outputs(backend, model, inputs, request)
            except ModelError as exc:
                self.outputs[cache] = None
                self.notes.append(f"probe set {part.probe_set!r}: residual not measured "
                                  f"({first_line(exc, empty='')})")
        out = self.outputs[cache]
        return out if out is None or rows is None or not whole else out[rows]

    def part(self, key: Key, step: int, kernel: NDArray[Any], rows: NDArray[np.int64] | None,
             outputs: NDArray[np.float64] | None) -> PartDynamics:
        """The dynamics of one part's kernel at ``step``, and remember what the next
        record compares with.

        Args:
            key: (probe set, subset, label) of the part.
            kernel: its kernel, 2-D (traced N × N or full (N·O) × (N·O)).
            rows: the part's samples in its probe set (``None``: all of them).
            outputs: the model's outputs on the part's samples ``(N, O)`` when a residual
                is asked for.
        """
        probe_set = key[0]
        k64 = as_kernel(kernel)  # checked in its own precision; float64, symmetrized
        k = min(self.top_k, int(k64.shape[0]))
        want = set(self.names)
        # one decomposition for every eigen-quantity, its round-off tolerance that of the
        # kernel's own precision (a float32 kernel's negative round-off is float32-sized)
        eig = top_eigenpairs(kernel, k) if want & EIGEN_VARIABLES else None
        out = PartDynamics()
        targets = self.targets.get(probe_set)
        if targets is not None:
            y = targets.values if rows is None else targets.values[rows]
            self._targets(out, want, k64, y, targets, outputs, eig)
        basis: NDArray[np.float64] | None = None
        if want & {"eigenspace_overlap", "eigenspace_overlap_init"} and np.any(k64):
            assert eig is not None
            basis = eig.vectors  # none for a zero kernel: its eigenvectors are arbitrary
        if "top_eigenvalues" in want:
            assert eig is not None
            out.arrays["top_eigenvalues"] = eig.values
            out.conventions["top_eigenvalues"] = (f"top {k} eigenvalues, descending, "
                                                  f"{self.kernel_text}")
        self._motion(out, want, key, step, k64, basis, k)
        return out

    def _targets(self, out: PartDynamics, want: set[str], k64: NDArray[np.float64],
                 y: NDArray[Any], targets: Targets, outputs: NDArray[np.float64] | None,
                 eig: Eigenpairs | None) -> None:
        kind = targets_text(targets)
        if "target_alignment" in want:
            out.scalars["target_alignment"] = target_alignment(k64, y, layout=self.layout)
            out.conventions["target_alignment"] = (f"centred kernel-target alignment, "
                                                   f"{self.kernel_text}, {kind}")
        if not want & {"residual_alignment", "residual_fractions"}:
            return
        assert eig is not None
        k = eig.k
        if outputs is None:  # the outputs were not finite (noted)
            ra_quadratic, fractions = math.nan, np.full(k, math.nan)
        else:
            ra = residual_alignment(k64, residual(outputs, y), eig=eig, layout=self.layout)
            ra_quadratic, fractions = ra.quadratic, ra.fractions
        text = f"r = f(x) - y ({kind}), {self.kernel_text}"
        if "residual_alignment" in want:
            out.scalars["residual_alignment"] = ra_quadratic
            out.conventions["residual_alignment"] = f"r^T K r / (||r||^2 Tr K), {text}"
        if "residual_fractions" in want:
            out.arrays["residual_fractions"] = np.asarray(fractions, dtype=np.float64)
            out.conventions["residual_fractions"] = (
                f"sum_(i<=k) (u_i^T r)^2 / ||r||^2 for k = 1..{k}, top eigenvectors u_i, {text}")

    def _motion(self, out: PartDynamics, want: set[str], key: Key, step: int,
                k64: NDArray[np.float64], basis: NDArray[np.float64] | None, k: int) -> None:
        prev, first = self.previous.get(key), self.initial.get(key)
        if first is None:  # the first record of this Recorder for this part
            origin = (f"step {step}, the first record after a resume (the run's earlier "
                      "kernels are not kept)") if self.resumed else f"the first record, step {step}"
            first = Memory(step, k64 if self._keep_kernel_init else None,
                           basis if self._keep_basis_init else None, origin)
            self.initial[key] = first
            if self.resumed and want & {"kernel_distance", "kernel_velocity",
                                        "eigenspace_overlap"}:
                self.notes.append(f"step {step}: kernel motion restarts here (resumed run: "
                                  "the previous record's kernel is not kept)")
        distance = math.nan
        if prev is not None and prev.kernel is not None:
            distance = kernel_distance(prev.kernel, k64) if prev.kernel.shape == k64.shape \
                else math.nan
        since = "no previous record" if prev is None else f"the previous record, step {prev.step}"
        frob = "1 - <K_s, K>_F / (||K_s||_F ||K||_F)"
        if "kernel_distance" in want:
            out.scalars["kernel_distance"] = distance
            out.conventions["kernel_distance"] = f"{frob}, {self.kernel_text}, K_s at {since}"
        if "kernel_velocity" in want:
            gap = None if prev is None else step - prev.step
            out.scalars["kernel_velocity"] = distance / gap if gap and gap > 0 else math.nan
            out.conventions["kernel_velocity"] = (f"kernel_distance / (step - previous step), "
                                                  f"{self.kernel_text}, K_s at {since}")
        if "kernel_distance_init" in want:
            assert first.kernel is not None
            out.scalars["kernel_distance_init"] = kernel_distance(first.kernel, k64)
            out.conventions["kernel_distance_init"] = (f"{frob}, {self.kernel_text}, K_s at "
                                                       f"{first.origin}")
        overlap = "||U_s^T U||_F^2 / k of the top k = " + str(k) + " eigenvectors" + (
            " (k = D: the whole space, 1 by construction)" if k == k64.shape[0] else "")
        if "eigenspace_overlap" in want:
            out.scalars["eigenspace_overlap"] = _overlap(None if prev is None else prev.basis,
                                                         basis)
            out.conventions["eigenspace_overlap"] = f"{overlap}, {self.kernel_text}, U_s at {since}"
        if "eigenspace_overlap_init" in want:
            out.scalars["eigenspace_overlap_init"] = _overlap(first.basis, basis)
            out.conventions["eigenspace_overlap_init"] = (f"{overlap}, {self.kernel_text}, U_s "
                                                          f"at {first.origin}")
        if self._keep_kernel or self._keep_basis:
            self.previous[key] = Memory(step, k64 if self._keep_kernel else None,
                                        basis if self._keep_basis else None)


def _overlap(a: NDArray[np.float64] | None, b: NDArray[np.float64] | None) -> float:
    """The overlap of two kept bases; NaN when either is missing (a zero kernel, no previous
    record) or their shapes differ."""
    if a is None or b is None or a.shape != b.shape:
        return math.nan
    return subspace_overlap(a, b)


def part_rows(parts: Sequence[Part], labels: Any) -> dict[Key, NDArray[np.int64] | None]:
    """Each part's samples in its probe set (their targets' rows): a subset's index, a
    class's samples (the ``labels=`` given), ``None`` for a whole probe set."""
    if labels is not None and not isinstance(labels, Mapping):
        labels = {parts[0].probe_set: labels}
    out: dict[Key, NDArray[np.int64] | None] = {}
    for p in parts:
        rows = p.index
        if p.label is not None and labels is not None:
            arr = _as_labels(labels[p.probe_set], len(labels[p.probe_set]), p.probe_set)
            text = np.asarray([_label_text(v) for v in arr])
            rows = np.flatnonzero(text == p.label).astype(np.int64)
        out[(p.probe_set, p.subset, p.label)] = rows
    return out


def summary_conventions(pending: Sequence[tuple[Part, PartDynamics]],
                        probe_set: str) -> dict[str, str]:
    """The conventions of a probe set's subset summaries (the mean over its subsets)."""
    for part, dyn in pending:
        if part.probe_set == probe_set and part.subset is not None:
            return {v: f"mean over subsets of: {c}" for v, c in dyn.conventions.items()}
    return {}


def collect_arrays(pending: Sequence[tuple[Part, PartDynamics]]) -> tuple[ArrayValue, ...]:
    """A record's arrays: each part's, then per probe set the element-wise mean of its
    subsets' arrays (``subset`` ``None``)."""
    arrays: list[ArrayValue] = []
    means: dict[tuple[str, str], list[NDArray[np.float64]]] = {}
    for part, dyn in pending:
        for var, data in dyn.arrays.items():
            arrays.append(ArrayValue(part.probe_set, var, tuple(float(x) for x in data),
                                     subset=part.subset, label=part.label,
                                     convention=dyn.conventions[var]))
            if part.subset is not None:
                means.setdefault((part.probe_set, var), []).append(data)
    for (probe_set, var), stack in means.items():
        mean = np.mean(np.stack(stack), axis=0)
        arrays.append(ArrayValue(probe_set, var, tuple(float(x) for x in mean),
                                 convention=summary_conventions(pending, probe_set).get(var)))
    return tuple(arrays)
