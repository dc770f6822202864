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
from collections.abc import Iterator
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
    JacobianProbes,
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

    def probes(self, model: Any, inputs: Any, request: KernelRequest, sample_axes: int = 1
               ) -> JacobianProbes:
        """The output Jacobian through vector-Jacobian products only
        (:class:`cvcore.protocols.JacobianProbes`)."""
        from cvcore.backends.jax.operator import jacobian_probes

        return jacobian_probes(model, inputs, request, sample_axes)

    def batch_first_model(self, model: Any, in_axes: Any, out_axis: int) -> Any:
        """The model wrapped to take and return batch-first arrays (``vmap_axes``,
        :mod:`cvcore.batch_axes`)."""
        from cvcore.backends.jax.setup import batch_first_model

        return batch_first_model(model, in_axes, out_axis)

    def output_shape(self, model: Any, inputs: Any, request: KernelRequest) -> tuple[int, ...]:
        """One sample's output shape ``S`` (:class:`cvcore.protocols.JacobianBackend`)."""
        from cvcore.backends.jax.jacobian import output_shape

        device = resolve_device(request.device)
        with scope(request, device):
            s = prepare(model, inputs, request, device, request.train)
            return output_shape(s.prep, s.x, request)

    def jacobians(self, model: Any, input_sets: tuple[Any, ...], request: KernelRequest
                  ) -> Iterator[tuple[np.ndarray, ...]]:
        """Per parameter group, the per-sample Jacobians ``(N_s, *S, P_group)`` of each
        input set (cross kernels and output axes, :mod:`cvcore.cross`)."""
        from cvcore.backends.jax.jacobian import jacobian_groups

        device = resolve_device(request.device)
        with scope(request, device):
            yield from jacobian_groups(model, input_sets, request, device)

    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
        """Each layer's kernel (layers by parameter-tree path): ``cvcore.protocols.LayerKernels``."""
        from cvcore.backends.jax.layers import layer_kernels

        return layer_kernels(model, inputs, request)

    def outputs(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray:
        """The selected output ``(N, O)`` in the request's dtype, as the kernel
        differentiates it: each sample alone (vmapped), or one batch under ``train=True``
        for a model that takes batches (:class:`cvcore.protocols.OutputsBackend`)."""
        import jax
        from cvcore.backends.jax.forms import select_output

        device = resolve_device(request.device)
        with scope(request, device):
            s = prepare(model, inputs, request, device, request.train)
            prep, output = s.prep, request.output
            if request.train and prep.batched:
                out = select_output(prep.call(prep.params, prep.constants, s.x), output)
            else:
                def single(xi: Any) -> Any:
                    xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
                    return select_output(prep.call(prep.params, prep.constants, xb),
                                         output).reshape(-1)

                out = jax.vmap(single)(s.x)
            return np.asarray(out).reshape(s.n, -1)

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
