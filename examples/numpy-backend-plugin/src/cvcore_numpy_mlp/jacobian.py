"""Per-sample Jacobians as kernel rows, and the kernel summed from them block by block
(:func:`cvcore.blocking.plan_blocks`).

The kernel is a sum over groups of parameter tensors, ``K = Σ_g J_g J_gᵀ``, and within a
group over pairs of sample blocks; only one or two blocks' Jacobians exist at a time, so
the memory budget bounds Jacobian storage whatever N is.
"""

from __future__ import annotations

import numpy as np
from cvcore.blocking import BlockPlan, Group
from cvcore.outputs import check_finite

from cvcore_numpy_mlp.model import Array, NumpyMLP


def jacobian_rows(model: NumpyMLP, x: Array, group: Group, plan: BlockPlan, start: int, stop: int,
                  traced: bool) -> Array:
    """The Jacobian of samples ``[start, stop)`` w.r.t. one group, as kernel rows:
    ``(b, O·P_g)`` for the traced kernel, ``(b·O, P_g)`` for the full one."""
    jac = np.concatenate([model.jacobian(x[a:b], group.members)
                          for a, b in plan.chunks(group, start, stop)])
    return jac.reshape(jac.shape[0], -1) if traced else jac.reshape(-1, jac.shape[2])


def assemble(model: NumpyMLP, x: Array, traced: bool, plan: BlockPlan) -> Array:
    """Accumulate the kernel over parameter groups and pairs of sample blocks."""
    n, o = x.shape[0], model.n_outputs
    width = 1 if traced else o
    kernel = np.zeros((n * width, n * width), dtype=x.dtype)
    scale = 1.0 / o if traced else 1.0
    for group in plan.groups:
        blocks = plan.sample_blocks(group)
        for index, (a0, a1) in enumerate(blocks):
            rows_a = jacobian_rows(model, x, group, plan, a0, a1, traced)
            kernel[a0 * width:a1 * width, a0 * width:a1 * width] += scale * (rows_a @ rows_a.T)
            for b0, b1 in blocks[index + 1:]:
                rows_b = jacobian_rows(model, x, group, plan, b0, b1, traced)
                block = scale * (rows_a @ rows_b.T)
                kernel[a0 * width:a1 * width, b0 * width:b1 * width] += block
                kernel[b0 * width:b1 * width, a0 * width:a1 * width] += block.T
    check_finite(np.diagonal(kernel), n, width)  # cvcore's own message, naming the samples
    return kernel
