"""Cross kernels of checkpoints (``cv measure --against``): ``K(probe, against)`` per checkpoint.

A cross kernel has no eigenvalues of its own (it is ``N₁ × N₂``), so no collective
variable: each checkpoint gives one :class:`CrossRow` of trace-free numbers
(:func:`cvcore.cross.summary`: shape, mean, Frobenius norm, the largest and the mean
singular value), and the kernels themselves can be saved (:func:`save_kernels`: one
``.npy``, or one ``.npz`` array per checkpoint), never half-written.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.api import execute, resolve
from cvcore.checkpoints import load_checkpoint
from cvcore.cross import CrossKernel, convention, summary
from cvcore.data_io import load_data, probe_subset
from cvcore.errors import CVCoreError, InputError
from cvcore.files import write_bytes_atomic
from cvcore.protocols import LoadOptions
from cvcore.request import MeasureRequest
from cvcore.runs import ProbeSpec, expand
from cvcore.validate import check_against


@dataclass(frozen=True)
class CrossRow:
    """One checkpoint's cross kernel: its summary, or the error that stopped it."""

    source: str
    backend: str
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    kernel: NDArray[Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready values (the kernel left out)."""
        out: dict[str, Any] = {"source": self.source, "backend": self.backend,
                               "seconds": round(self.seconds, 4), **self.summary}
        if self.error is not None:
            out["error"] = self.error
        return out


def _inputs(spec: ProbeSpec, what: str) -> Any:
    if spec.data is None:
        raise InputError(f"expected --data for {what} of a kernel summary, got none")
    return probe_subset(load_data(spec.data, spec.key), spec.samples, spec.seed)


def measure_cross(paths: Sequence[str | Path], *, probe: ProbeSpec, against: ProbeSpec | None,
                  request: MeasureRequest, options: LoadOptions,
                  fail_fast: bool = True) -> Iterator[CrossRow]:
    """One :class:`CrossRow` per checkpoint: ``K(probe, against)`` as ``request`` says
    (its ``against`` is replaced by the inputs ``against`` names; ``None``: the probe's
    self kernel with ``request.axes``)."""
    from dataclasses import replace

    x1 = _inputs(probe, "the probe inputs")
    x2 = None if against is None else _inputs(against, "the second input set")
    if x2 is not None:
        check_against(x2, request.kernel, request.axes)
    req = replace(request, against=x2)
    for path in expand(paths):
        started = time.perf_counter()
        try:
            loaded = load_checkpoint(path, options)
            r_req = req if req.backend is not None or loaded.backend is None else \
                replace(req, backend=loaded.backend)
            done = execute(resolve(loaded.model, x1, r_req), r_req)
            ck = done.cross
            if ck is None:  # the self kernel in cvcore's convention (--save-kernel alone)
                assert done.result is not None
                res = done.result
                ck = CrossKernel(kernel=np.asarray(res.kernel), n_samples=(res.n_samples,) * 2,
                                 output_shape=(res.n_outputs,), n_params=res.n_params,
                                 convention=convention(req.kernel.kernel, None))
            yield CrossRow(source=str(path), backend=done.backend,
                           seconds=time.perf_counter() - started, summary=summary(ck),
                           kernel=ck.kernel)
        except CVCoreError as exc:
            if fail_fast:
                raise
            yield CrossRow(source=str(path), backend=req.backend or "",
                           seconds=time.perf_counter() - started,
                           error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def save_kernels(path: str | Path, rows: Sequence[CrossRow]) -> None:
    """The rows' kernels into ``path``: a ``.npy`` of the one kernel, or a ``.npz`` with
    one array per checkpoint (named by its file's stem, made unique); atomic."""
    kept = [r for r in rows if r.kernel is not None]
    target = Path(path)
    buffer = io.BytesIO()
    if target.suffix == ".npz":
        names: dict[str, NDArray[Any]] = {}
        for r in kept:
            stem = Path(r.source).stem or "kernel"
            name, k = stem, 1
            while name in names:
                k += 1
                name = f"{stem}_{k}"
            assert r.kernel is not None
            names[name] = r.kernel
        np.savez(buffer, **names)  # type: ignore[arg-type]
    elif target.suffix == ".npy":
        if len(kept) != 1:
            raise InputError(f"expected one measured checkpoint for a .npy --save-kernel, got "
                             f"{len(kept)}; use a .npz file")
        assert kept[0].kernel is not None
        np.save(buffer, kept[0].kernel)
    else:
        raise InputError(f"expected --save-kernel ending in .npy or .npz, got {target.name!r}")
    write_bytes_atomic(target, buffer.getvalue())


__all__ = ["CrossRow", "measure_cross", "save_kernels"]
