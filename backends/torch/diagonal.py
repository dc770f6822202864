"""The kernel's diagonal ``K_ii`` (and so its trace) without building the kernel.

``K_(i,o),(i,o) = ‖J_io‖²`` is a per-sample quantity: for a parameter with a layer rule
it comes from the same captured inputs and output-gradients as the structured kernel
(:func:`cvcore.backends.torch.rules.feature_diagonal`, for a dense layer
``‖a_i‖²·‖g_io‖²``), for every other parameter from per-sample Jacobians, squared and
summed, one chunk of samples at a time. Nothing of size ``N²`` is ever formed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.protocols import KernelRequest

from .jacobian import JacobianFn
from .setup import Prepared


def _structured_diagonal(prep: Prepared, x: Any, request: KernelRequest, n_outputs: int
                         ) -> tuple[Any, frozenset[str]]:
    """``‖J_io‖²`` summed over parameters with a rule, and the names of those parameters."""
    import torch

    from cvcore.data_io import batch_size, slice_inputs

    from .rules import feature_diagonal
    from .structured import (
        _Coupled,
        _per_sample_bytes,
        _sample_blocks,
        capture_block,
    )

    n = batch_size(x)
    ref = next(iter(prep.params.values()))
    diag = torch.zeros((n, n_outputs), dtype=ref.dtype, device=ref.device)
    if request.train:
        return diag, frozenset()
    budget = int(request.memory_budget)
    structured: frozenset[str] | None = None
    try:
        blocks = _sample_blocks(n, _per_sample_bytes(prep, x, request, n_outputs), budget)
        for a, b in blocks:
            block = capture_block(prep, slice_inputs(x, a, b), request, keep=structured,
                                  check=structured is None)
            if structured is None:
                structured = block.structured
            elif not structured <= block.structured:
                return diag.zero_(), frozenset()
            for f in block.features.values():
                diag[a:b] += feature_diagonal(f, budget)
    except _Coupled:
        return diag.zero_(), frozenset()
    return diag, structured or frozenset()


def _jacobian_diagonal(prep: Prepared, x: Any, request: KernelRequest, names: list[str], n_outputs: int,
                       jac: JacobianFn) -> Any:
    """``‖J_io‖²`` over ``names`` from per-sample Jacobians, in memory-bounded chunks."""
    import torch

    from cvcore.blocking import plan_blocks
    from cvcore.data_io import batch_size, slice_inputs

    n = batch_size(x)
    ref = next(iter(prep.params.values()))
    diag = torch.zeros((n, n_outputs), dtype=ref.dtype, device=ref.device)
    sizes = [int(prep.params[k].numel()) for k in names]
    plan = plan_blocks(n_samples=n, n_outputs=n_outputs, group_sizes=sizes,
                       itemsize=ref.element_size(), budget=int(request.memory_budget))
    for group in plan.groups:
        group_names = [names[i] for i in group.members]
        chunks = [(0, n)] if request.train else plan.chunks(group, 0, n)
        for a, b in chunks:
            j = jac(prep, group_names, slice_inputs(x, a, b), request)
            diag[a:b] += (j * j).sum(-1)
    return diag


def diagonal_of(prep: Prepared, x: Any, request: KernelRequest, n_outputs: int, jac: JacobianFn) -> Any:
    """``K_ii`` as a torch tensor: ``N`` values (traced) or ``N·O`` values (full).

    Args:
        prep: the prepared model (``cvcore.backends.torch.setup.Prepared``).
        x: inputs on the device, in the computation's dtype.
        request: the :class:`cvcore.protocols.KernelRequest`; ``implementation="jacobian"``
            skips the layer rules.
        n_outputs: outputs per sample ``O``.
        jac: the backend's per-sample Jacobian function for parameters without a rule.
    """
    from cvcore.protocols import Implementation

    from .jacobian import functional_jacobian

    use_rules = request.implementation != Implementation.JACOBIAN and jac is functional_jacobian
    if use_rules:
        diag, done = _structured_diagonal(prep, x, request, n_outputs)
    else:
        diag, done = None, frozenset()
    rest = [k for k in prep.params if k not in done]
    if rest:
        extra = _jacobian_diagonal(prep, x, request, rest, n_outputs, jac)
        diag = extra if diag is None else diag + extra
    return diag.mean(dim=1) if request.kernel == "traced" else diag.reshape(-1)


def kernel_diagonal(model: Any, inputs: Any, request: KernelRequest) -> NDArray[np.floating[Any]]:
    """What ``TorchBackend.diagonal`` returns: ``K_ii`` as NumPy, without the kernel.

    Traced convention: ``(1/O) Σ_o ‖J_io‖²`` (``N`` values); full: ``‖J_io‖²`` in row
    order ``i·O + o`` (``N·O`` values). ``Tr K`` is their sum.
    """
    import torch

    from cvcore.data_io import batch_size, require_samples

    from .jacobian import choose_jacobian
    from .setup import (
        as_inputs,
        forward,
        prepare_model,
        probe,
        resolve_device,
        training_mode,
    )

    device = resolve_device(request.device)
    dtype = torch.float64 if request.dtype == "float64" else torch.float32
    prep = prepare_model(model, dtype, device)
    x = as_inputs(inputs, dtype, device)
    require_samples(batch_size(x))
    with training_mode(prep.module, request.train), torch.no_grad():
        probed = (forward(prep, x, request.output)[0] if request.train
                  else probe(prep, x, request.output))
    with training_mode(prep.module, request.train):
        diag = diagonal_of(prep, x, request, int(probed.numel()), choose_jacobian(prep))
    return diag.detach().cpu().numpy()
