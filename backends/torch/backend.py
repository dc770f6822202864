"""The PyTorch backend's class: :class:`TorchBackend`, what the ``torch`` plugin registers.

It dispatches a request: the structured path (:mod:`cvcore.backends.torch.structured`)
when its layer rules apply, else the Jacobian path (:mod:`cvcore.backends.torch.jacobian`);
the diagonal, the matrix-free operator and the per-layer kernels are in
:mod:`diagonal`, :mod:`operator` and :mod:`layers`. Importing this module does not import
torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from cvcore.backends.torch.jacobian import (
    assemble,
    choose_jacobian,
    functional_jacobian,
)
from cvcore.backends.torch.setup import (
    Setup,
    full_precision,
    home_device,
    is_scripted,
    prepare,
    resolve_device,
    training_mode,
)

from cvcore.blocking import plan_blocks
from cvcore.errors import InputError
from cvcore.imports import require
from cvcore.memory import ensure_fits
from cvcore.protocols import (
    Implementation,
    JacobianProbes,
    KernelOperator,
    KernelRequest,
    KernelResult,
    LayerKernels,
)


class TorchBackend:
    """Backend for ``torch.nn.Module``, ``torch.export`` programs and TorchScript modules."""

    name = "torch"
    extra = "torch"
    modules: tuple[str, ...] = ("torch",)

    def available(self) -> bool:
        return importlib.util.find_spec("torch") is not None

    def accepts(self, model: object) -> bool:
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        keras = sys.modules.get("keras")
        if keras is not None and isinstance(model, keras.layers.Layer):
            # A Keras 3 model on the torch backend is an nn.Module too, but
            # functional_call gives it all-zero Jacobians: the tensorflow backend
            # (Keras' stateless_call) measures it.
            return False
        return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        home = home_device(model)
        device = home if is_scripted(model) and request.device is None and home else \
            resolve_device(request.device)
        try:
            return self._ntk(model, inputs, request, device)
        except InputError as exc:
            # A model that keeps plain (unregistered) tensors on its own device cannot run
            # elsewhere: measure it where it lives rather than on the default GPU.
            if request.device is None and home and home != device and "device" in str(exc):
                warnings.warn(f"cvcore: the model does not run on {device} ({exc}); measuring "
                              f"it on {home}, where its parameters are", stacklevel=2)
                return self._ntk(model, inputs, request, home)
            raise

    def _ntk(self, model: Any, inputs: Any, request: KernelRequest, device: str) -> KernelResult:
        torch = require("torch")
        s = prepare(model, inputs, request, device)
        ensure_fits(s.n, s.n_outputs, request.kernel, s.itemsize)
        prep, x, n, n_outputs, dtype = s.prep, s.x, s.n, s.n_outputs, s.dtype
        jac = choose_jacobian(prep)
        plan = plan_blocks(n_samples=n, n_outputs=n_outputs,
                           group_sizes=[int(p.numel()) for p in prep.params.values()],
                           itemsize=torch.finfo(dtype).bits // 8, budget=request.memory_budget)
        rules: dict[str, str] = {}
        with training_mode(prep.module, request.train), full_precision():
            kernel = None
            if request.implementation != Implementation.JACOBIAN and jac is functional_jacobian:
                from cvcore.backends.torch.structured import structured_kernel

                kernel = structured_kernel(prep, x, request, n_outputs, rules)
            if kernel is None:
                kernel = assemble(prep, x, request, plan, jac, n_outputs, device, dtype)
        return KernelResult(kernel=kernel, n_samples=n, n_outputs=n_outputs,
                            n_params=sum(int(p.numel()) for p in prep.params.values()),
                            device=device, rules=rules)


    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
        """Each layer's (module's) kernel: ``cvcore.protocols.LayerKernels``."""
        from cvcore.backends.torch.layers import layer_kernels

        return layer_kernels(model, inputs, request)

    def diagonal(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray:
        """``K_ii`` without building the kernel: traced ``(1/O) Σ_o ‖J_io‖²`` (N values),
        full ``‖J_io‖²`` (N·O values, row ``i·O + o``); their sum is ``Tr K``."""
        from cvcore.backends.torch.diagonal import kernel_diagonal

        with full_precision():
            return kernel_diagonal(model, inputs, request)

    def batch_first_model(self, model: Any, in_axes: Any, out_axis: int) -> Any:
        """The model wrapped to take and return batch-first arrays (``vmap_axes``,
        :mod:`cvcore.batch_axes`)."""
        from cvcore.backends.torch.setup import batch_first_model

        return batch_first_model(model, in_axes, out_axis)

    def output_shape(self, model: Any, inputs: Any, request: KernelRequest) -> tuple[int, ...]:
        """One sample's output shape ``S`` (:class:`cvcore.protocols.JacobianBackend`)."""
        from cvcore.backends.torch.jacobian import output_shape

        return output_shape(model, inputs, request, resolve_device(request.device))

    def jacobians(self, model: Any, input_sets: tuple[Any, ...], request: KernelRequest
                  ) -> Iterator[tuple[np.ndarray, ...]]:
        """Per parameter group, the per-sample Jacobians ``(N_s, *S, P_group)`` of each
        input set (cross kernels and output axes, :mod:`cvcore.cross`)."""
        from cvcore.backends.torch.jacobian import jacobian_groups

        return jacobian_groups(model, input_sets, request, resolve_device(request.device))

    def operator(self, model: Any, inputs: Any, request: KernelRequest) -> KernelOperator:
        """The kernel as a matrix-free ``K @ V`` operator (:class:`cvcore.protocols.KernelOperator`)."""
        from cvcore.backends.torch.operator import kernel_operator

        return kernel_operator(model, inputs, request)

    def probes(self, model: Any, inputs: Any, request: KernelRequest, sample_axes: int = 1
               ) -> JacobianProbes:
        """The output Jacobian through vector-Jacobian products only
        (:class:`cvcore.protocols.JacobianProbes`)."""
        from cvcore.backends.torch.operator import jacobian_probes

        return jacobian_probes(model, inputs, request, sample_axes)

    def outputs(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray:
        """The selected output ``(N, O)`` in the request's dtype, as the kernel
        differentiates it: each sample alone in eval mode, one batch under ``train=True``
        (:class:`cvcore.protocols.OutputsBackend`)."""
        torch = require("torch")
        from cvcore.backends.torch.jacobian import vmap_refusal
        from cvcore.backends.torch.setup import fcall, forward, pad_batch, select_output

        from cvcore.data_io import slice_inputs

        home = home_device(model)
        device = home if is_scripted(model) and request.device is None and home else \
            resolve_device(request.device)
        s = prepare(model, inputs, request, device)
        prep, output = s.prep, request.output
        tensors = {**prep.constants, **prep.params}

        def single(xi: Any) -> Any:
            batched = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), xi)
            return select_output(fcall(prep.module, tensors, batched), output)[0]

        with training_mode(prep.module, request.train), torch.no_grad(), full_precision():
            out = None
            if request.train:
                out = forward(prep, s.x, output)
            elif not prep.scripted and prep.export_batch is None:
                try:
                    out = torch.func.vmap(single)(s.x)
                except RuntimeError as exc:  # side effects: one sample at a time below
                    if not (vmap_refusal(exc) or "random operation" in str(exc)):
                        raise
            if out is None:
                size = prep.export_batch
                out = torch.cat([
                    forward(prep, pad_batch(slice_inputs(s.x, i, i + 1), size) if size
                            else slice_inputs(s.x, i, i + 1), output)[:1]
                    for i in range(s.n)])
        return out.reshape(s.n, -1).detach().cpu().numpy()

    def setup(self, model: Any, inputs: Any, request: KernelRequest, device: str
              ) -> Setup:
        """The prepared model, inputs, ``N``, ``O``, dtype and device (a :class:`Setup`)."""
        return prepare(model, inputs, request, device)

    # -- the framework chores the core asks of a backend (cvcore.capabilities) -----------

    def seed(self, seed: int) -> None:
        """Seed torch's generators (CPU and CUDA): dropout under ``train=True``."""
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "manual_seed"):
            torch.manual_seed(seed)

    @contextlib.contextmanager
    def guard(self, model: Any) -> Iterator[None]:
        """Run the body with gradients enabled and put back torch's CPU and (initialised)
        CUDA generators (``torch.random.fork_rng``), grad mode, every submodule's
        train/eval flag and every parameter's ``.grad`` and ``requires_grad``."""
        import torch

        cuda = torch.cuda
        devices = list(range(cuda.device_count())) if cuda.is_initialized() else []
        modules: list[tuple[Any, bool]] = []
        params: list[tuple[Any, Any, bool]] = []
        if isinstance(model, torch.nn.Module):
            modules = [(m, m.training) for m in model.modules()]
            params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
        with torch.random.fork_rng(devices=devices):
            try:
                with torch.enable_grad():
                    yield
            finally:
                for m, flag in modules:
                    m.training = flag
                for p, grad, flag in params:
                    if p.requires_grad != flag:
                        p.requires_grad_(flag)
                    if p.grad is not grad:
                        p.grad = grad

    def count_parameters(self, model: Any) -> int | None:
        """Trainable scalars of a module (``parameters()`` with ``requires_grad``)."""
        params = getattr(model, "parameters", None)
        if not callable(params):
            return None
        try:
            return int(sum(int(p.numel()) for p in params() if getattr(p, "requires_grad", True)))
        except Exception:  # noqa: BLE001 - not a torch module after all
            return None

    def take(self, inputs: Any, index: np.ndarray[Any, Any]) -> Any:
        """Rows ``index`` of a tensor."""
        return inputs[index.tolist()]

    def as_array(self, values: np.ndarray[Any, Any], like: Any) -> Any:
        """``values`` as a tensor of ``like``'s dtype and device."""
        import torch

        return torch.as_tensor(values, dtype=like.dtype, device=like.device)
