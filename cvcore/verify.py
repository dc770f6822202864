"""``verify``: the chosen implementation against the generic Jacobian path.

A kernel entry ``K_ij`` depends on samples i and j alone (docs/concepts.md), so the
kernel measured on a few samples by the Jacobian path must equal the corresponding
block of any implementation's kernel on the whole probe set. :func:`check` draws those
samples, builds that block with ``implementation="jacobian"``, and raises
:class:`VerificationError` naming the layer rules involved when they disagree beyond
round-off.

It is not on by default: on the benchmark models (docs/benchmarks.md) the check costs
about 60 ms of CPU time, 2-6x a whole ``auto`` call on the 784-256-256-10 MLP and about 9 %
on the CNN, more than the 5 % a default may cost. The structured path's own row checks
(:mod:`cvcore.backends.torch.rowcheck`) are always on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.data_io import take
from cvcore.errors import ModelError
from cvcore.protocols import Backend, Implementation, KernelRequest, KernelResult

#: Samples the check measures with the Jacobian path.
SAMPLES = 4
#: ``max|K_rule − K_jac| / max|K_jac|`` beyond which the two disagree, by dtype.
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


class VerificationError(ModelError):
    """The chosen implementation disagrees with the generic Jacobian path."""


def sample_index(n: int, seed: int = 0) -> NDArray[np.int64]:
    """The samples checked: a fixed random few, in order."""
    m = min(n, SAMPLES)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False)).astype(np.int64)


def check(backend: Backend, model: Any, inputs: Any, request: KernelRequest, result: KernelResult,
          seed: int = 0) -> float:
    """Raise :class:`VerificationError` when ``result`` disagrees with the Jacobian path.

    Returns:
        The relative disagreement ``max|ΔK| / max|K_jac|`` on the checked samples.
    """
    index = sample_index(result.n_samples, seed)
    reference = np.asarray(backend.ntk(model, take(inputs, index, backend), replace(
        request, implementation=Implementation.JACOBIAN)).kernel, dtype=np.float64)
    width = result.n_outputs if request.kernel == "full" else 1
    rows = (index[:, None] * width + np.arange(width)[None, :]).reshape(-1)
    block = np.asarray(result.kernel, dtype=np.float64)[np.ix_(rows, rows)]
    scale = float(np.abs(reference).max())
    error = float(np.abs(block - reference).max()) / scale if scale > 0 else float(
        np.abs(block).max() > 0)
    if error > TOLERANCE[request.dtype]:
        rules = ", ".join(f"{name}: {rule}" for name, rule in sorted(result.rules.items()))
        raise VerificationError(
            f"expected implementation={request.implementation.value!r} to match the Jacobian "
            f"path, got a relative difference of {error:.3g} on samples {index.tolist()} "
            f"(tolerance {TOLERANCE[request.dtype]:g}); layer rules involved: "
            f"{rules or 'none reported by backend ' + repr(backend.name)}; measure with "
            "implementation='jacobian' and report the model"
        )
    return error
