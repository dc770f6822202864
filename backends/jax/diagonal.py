"""The JAX NTK's diagonal ``K_ii`` without forming the kernel (``JaxBackend.diagonal``).

``K_(i,o),(i,o) = ‖J_io‖²`` from the per-layer rules when they apply
(:func:`cvcore.backends.jax.structured.structured_diagonal`), else from the same jitted,
vmapped per-sample Jacobians as the kernel (:func:`cvcore.backends.jax.jacobian.make_jacobian`),
squared and summed on the device one chunk of samples at a time (chunks and parameter
groups from :func:`cvcore.blocking.plan_blocks`, as for the kernel). Nothing of size
``N²`` is formed. Traced: ``(1/O) Σ_o ‖J_io‖²`` (``N`` values); full: ``‖J_io‖²``
(``N·O`` values, row ``i·O + o``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.blocking import plan_blocks
from cvcore.outputs import check_finite
from cvcore.protocols import Implementation, KernelRequest

from . import setup
from .jacobian import make_jacobian


def kernel_diagonal(model: Any, inputs: Any, request: KernelRequest) -> NDArray[np.floating[Any]]:
    """What ``JaxBackend.diagonal`` returns: ``K_ii`` as NumPy in the request's dtype.

    Traced: ``(1/O) Σ_o ‖J_io‖²`` (``N`` values); full: ``‖J_io‖²`` in row order
    ``i·O + o`` (``N·O`` values). ``Tr K`` is their sum.
    """
    device = setup.resolve_device(request.device)
    with setup.scope(request, device):
        return _diagonal(model, inputs, request, device)


def _diagonal(model: Any, inputs: Any, request: KernelRequest, device: Any) -> NDArray[Any]:
    import jax.numpy as jnp

    s = setup.prepare(model, inputs, request, device, request.train)
    if request.implementation != Implementation.JACOBIAN:
        from .structured import attempt, structured_diagonal

        ruled = attempt(structured_diagonal, s.prep, s.leaves, s.x, request, s.n_outputs)
        if ruled is not None:
            check_finite(ruled, s.n, s.n_outputs)
            return ruled.mean(axis=1) if request.kernel == "traced" else ruled.reshape(-1)
    plan = plan_blocks(n_samples=s.n, n_outputs=s.n_outputs, group_sizes=s.sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    whole_batch = request.train and s.prep.batched  # one Jacobian of the coupled batch
    diag = np.zeros((s.n, s.n_outputs), dtype=np.dtype(request.dtype))
    for group in plan.groups:
        jac = make_jacobian(s.prep, s.leaves, group, request, s.n_outputs)
        chunks = [(0, s.n)] if whole_batch else plan.chunks(group, 0, s.n)
        size = max(b - a for a, b in chunks)
        for a, b in chunks:
            j = jac(s.x, a, b, size)  # (b - a, O, P_group), on the device
            diag[a:b] += np.asarray(jnp.sum(j * j, axis=2))
    check_finite(diag, s.n, s.n_outputs)
    return diag.mean(axis=1) if request.kernel == "traced" else diag.reshape(-1)
