"""``K_ii`` without the kernel (the optional ``diagonal`` capability,
:class:`cvcore.protocols.DiagonalBackend`): ``K_(i,o),(i,o) = ‖J_io‖²``, squared and summed
one chunk of samples at a time, so nothing of size ``N²`` is formed.
"""

from __future__ import annotations

import numpy as np
from cvcore.blocking import plan_blocks
from cvcore.outputs import check_finite
from cvcore.protocols import KernelRequest

from cvcore_numpy_mlp.model import Array, NumpyMLP


def diagonal_of(model: NumpyMLP, x: Array, request: KernelRequest) -> Array:
    """Traced: ``(1/O) Σ_o ‖J_io‖²`` (``N`` values); full: ``‖J_io‖²`` in row order
    ``i·O + o`` (``N·O`` values); in ``x``'s dtype. ``Tr K`` is their sum."""
    n, o = x.shape[0], model.n_outputs
    tensors = model.tensors()
    plan = plan_blocks(n_samples=n, n_outputs=o, group_sizes=[t.size for t in tensors],
                       itemsize=x.dtype.itemsize, budget=request.memory_budget)
    diag = np.zeros((n, o), dtype=x.dtype)
    for group in plan.groups:
        for a, b in plan.chunks(group, 0, n):
            jac = model.jacobian(x[a:b], group.members)  # (b - a, O, P_g)
            diag[a:b] += np.einsum("iop,iop->io", jac, jac)
    check_finite(diag, n, o)
    return diag.mean(axis=1) if request.kernel == "traced" else diag.reshape(-1)
