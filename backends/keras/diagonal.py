"""The kernel's diagonal ``K_ii`` (and so its trace) from an :class:`Engine`, without the
kernel: ``K_(i,o),(i,o) = ‖J_io‖²``, squared and summed one chunk of samples at a time.

Nothing of size ``N²`` is formed and no two chunks' Jacobians are held together, so the
parameter groups are the plan's for a single sample (all parameters at once when one
sample's Jacobian fits half the budget): each sample goes through the model once per
group, where the kernel's plan, which holds a group's Jacobian for all ``N`` samples,
needs more groups. In train mode the samples are one chunk (batch statistics couple
them), as for the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvcore.blocking import plan_blocks
from cvcore.data_io import slice_inputs
from cvcore.outputs import check_finite
from cvcore.protocols import KernelRequest

from .jacobian import Engine


def diagonal_of(engine: Engine, x: Any, request: KernelRequest, n: int,
                    n_outputs: int) -> np.ndarray[Any, Any]:
    """``K_ii`` as NumPy: traced ``(1/O) Σ_o ‖J_io‖²`` (``N`` values), full ``‖J_io‖²`` in
    row order ``i·O + o`` (``N·O`` values).

    Args:
        engine: the model's engine (native inputs ``x``).
        x: the inputs as the engine's native tensors.
        request: the :class:`cvcore.protocols.KernelRequest`.
        n: number of samples.
        n_outputs: outputs per sample ``O``.
    """
    plan = plan_blocks(n_samples=1, n_outputs=n_outputs, group_sizes=engine.sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    diag = np.zeros((n, n_outputs), dtype=np.float64)
    for group in plan.groups:
        chunks = [(0, n)] if request.train else plan.chunks(group, 0, n)
        for a, b in chunks:
            diag[a:b] += engine.norms(engine.jacobian(group.members, slice_inputs(x, a, b)))
    out = diag.mean(axis=1) if request.kernel == "traced" else diag.reshape(-1)
    check_finite(out, n, 1 if request.kernel == "traced" else n_outputs)
    return out.astype(request.dtype)
