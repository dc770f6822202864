"""The kernel split by layer (``per_layer=True``) for PyTorch: one kernel per module.

``K = Σ_l K_l`` over modules, each ``K_l`` the sum over that module's own parameters
(the module path is the parameter's name without its last component, ``(root)`` for the
model's own parameters). When an adapter wrapped the user's model in a module of its own
(an auto-encoder's reconstruction, a graph network run on its graph), the wrapper names
the attribute holding the user's model in ``cvcore_wraps`` and that prefix is left off,
so the rows carry the user's module paths (:func:`layer_naming`). The structured
path forms per-parameter blocks anyway, so it adds each to its module's kernel
(:func:`cvcore.backends.torch.structured.structured_parts`); parameters without a rule,
and every parameter under ``implementation="jacobian"``, go through the Jacobian path one
module at a time (one forward and backward pass per module and sample block).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from cvcore.protocols import Implementation, KernelRequest, LayerKernel, LayerKernels, layer_of

from .jacobian import JacobianFn
from .setup import Prepared


def layer_naming(model: Any) -> Callable[[str], str]:
    """``parameter name -> layer``: :func:`cvcore.protocols.layer_of` of the name in the
    user's model, the adapter wrapper's ``cvcore_wraps`` attribute (``"ae"``) left off."""
    wraps = getattr(model, "cvcore_wraps", None)
    prefix = f"{wraps}." if isinstance(wraps, str) and wraps else None

    def name(parameter: str) -> str:
        if prefix is not None and parameter.startswith(prefix):
            parameter = parameter[len(prefix):]
        return layer_of(parameter)

    return name


def _restricted(prep: Prepared, x: Any, request: KernelRequest, names: list[str], n_outputs: int,
                jac: JacobianFn, dtype: Any, device: str) -> Any:
    """The Jacobian path's kernel over ``names`` only (the others held fixed)."""
    import torch

    from cvcore.blocking import plan_blocks
    from cvcore.data_io import batch_size

    from .jacobian import assemble

    sub = dataclasses.replace(
        prep, params={k: prep.params[k] for k in names},
        constants={**prep.constants, **{k: v for k, v in prep.params.items() if k not in names}})
    plan = plan_blocks(n_samples=batch_size(x), n_outputs=n_outputs,
                       group_sizes=[int(sub.params[k].numel()) for k in names],
                       itemsize=torch.finfo(dtype).bits // 8, budget=request.memory_budget)
    return assemble(sub, x, request, plan, jac, n_outputs, device, dtype)


def layer_kernels(model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
    """What ``TorchBackend.layer_kernels`` returns (see the module doc)."""
    from cvcore.memory import ensure_fits

    from .jacobian import choose_jacobian, functional_jacobian
    from .setup import (
        full_precision,
        home_device,
        prepare,
        resolve_device,
        training_mode,
    )

    home = home_device(model)
    device = resolve_device(request.device)
    if backend_is_scripted(model) and request.device is None and home:
        device = home
    s = prepare(model, inputs, request, device)
    ensure_fits(s.n, s.n_outputs, request.kernel, s.itemsize)
    prep, x, n, n_outputs, dtype = s.prep, s.x, s.n, s.n_outputs, s.dtype
    jac = choose_jacobian(prep)
    layer_name = layer_naming(model)
    groups: dict[str, list[str]] = {}
    for name in prep.params:
        groups.setdefault(layer_name(name), []).append(name)
    with training_mode(prep.module, request.train), full_precision():
        parts = None
        if request.implementation != Implementation.JACOBIAN and jac is functional_jacobian:
            from .structured import structured_parts

            parts = structured_parts(prep, x, request, n_outputs, layer_name)
        if parts is None:
            parts = {layer: _restricted(prep, x, request, names, n_outputs, jac, dtype, device)
                     for layer, names in groups.items()}
    layers = tuple(LayerKernel(name=layer, kernel=parts[layer],
                               n_params=sum(int(prep.params[k].numel()) for k in names))
                   for layer, names in groups.items())
    return LayerKernels(layers=layers, n_samples=n, n_outputs=n_outputs, device=device)


def backend_is_scripted(model: Any) -> bool:
    from .setup import is_scripted

    return bool(is_scripted(model))
