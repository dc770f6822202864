"""The JAX backend's class: :class:`JaxBackend`, what the ``jax`` plugin registers.

It dispatches a request to the engines below it: the structured path
(:mod:`cvcore.backends.jax.structured`) when its layer rules apply, else the Jacobian path
(:mod:`cvcore.backends.jax.jacobian`); the diagonal, the matrix-free operator and the
per-layer kernels are in :mod:`diagonal`, :mod:`operator` and :mod:`layers`. The model
forms it accepts are described in :mod:`cvcore.backends.jax.setup`. Importing this module
does not import JAX.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
from cvcore.backends.jax.forms import model_form
from cvcore.backends.jax.setup import (
    device_name,
    prepare,
    resolve_device,
    scope,
)

from cvcore.memory import ensure_fits
from cvcore.protocols import (
    KernelOperator,
    KernelRequest,
    KernelResult,
    LayerKernels,
)


class JaxBackend:
    """Backend for JAX models: ``(apply_fn, params)``, flax linen / nnx, equinox."""

    name = "jax"
    extra = "jax"
    modules: tuple[str, ...] = ("jax", "flax", "equinox")

    def available(self) -> bool:
        return importlib.util.find_spec("jax") is not None

    def accepts(self, model: object) -> bool:
        return model_form(model) is not None

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        device = resolve_device(request.device)
        with scope(request, device):
            return self._ntk(model, inputs, request, device)

    def diagonal(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray:
        """``K_ii`` without building the kernel: traced ``(1/O) Σ_o ‖J_io‖²`` (N values),
        full ``‖J_io‖²`` (N·O values, row ``i·O + o``); their sum is ``Tr K``."""
        from cvcore.backends.jax.diagonal import kernel_diagonal

        return kernel_diagonal(model, inputs, request)

    def operator(self, model: Any, inputs: Any, request: KernelRequest) -> KernelOperator:
        """The kernel as a matrix-free ``K @ V`` operator (:class:`cvcore.protocols.KernelOperator`)."""
        from cvcore.backends.jax.operator import kernel_operator

        return kernel_operator(model, inputs, request)

    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
        """Each layer's kernel (layers by parameter-tree path): ``cvcore.protocols.LayerKernels``."""
        from cvcore.backends.jax.layers import layer_kernels

        return layer_kernels(model, inputs, request)

    # -- the framework chores the core asks of a backend (cvcore.capabilities) -----------
    # JAX has no global random state (its keys are values), so it has no ``seed`` or
    # ``guard``; a ``(apply_fn, params)`` pair has no cheap parameter count either.

    def take(self, inputs: Any, index: np.ndarray[Any, Any]) -> Any:
        """Rows ``index`` of an array (JAX refuses a list as an index)."""
        return inputs[np.asarray(index)]

    def as_array(self, values: np.ndarray[Any, Any], like: Any) -> Any:
        """``values`` as a JAX array of ``like``'s dtype."""
        import jax.numpy as jnp

        return jnp.asarray(values, dtype=like.dtype)

    def _ntk(self, model: Any, inputs: Any, request: KernelRequest, device: Any) -> KernelResult:
        from cvcore.backends.jax.structured import kernel_of

        s = prepare(model, inputs, request, device, request.train)
        ensure_fits(s.n, s.n_outputs, request.kernel, np.dtype(request.dtype).itemsize)
        kernel = kernel_of(s.prep, s.leaves, s.x, request, s.n_outputs)
        return KernelResult(kernel=kernel, n_samples=s.n, n_outputs=s.n_outputs,
                            n_params=sum(int(s.leaves.values[i].size) for i in s.leaves.trainable),
                            device=device_name(device))
