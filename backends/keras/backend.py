"""The TensorFlow / Keras backend: Keras 3 models on any Keras backend, ``tf.Module`` s and
restored SavedModels.

A Keras model is measured through ``model.stateless_call(trainable, non_trainable, x)``
with the weights passed in as plain tensors, so the user's model is never modified. On
the JAX Keras backend it is a JAX function and goes to the JAX backend, structured
engine included (:mod:`cvcore.backends.keras.bridge`); on TensorFlow and torch it is
differentiated with ``tf.GradientTape`` or ``torch.func.jacrev``
(:mod:`cvcore.backends.keras.jacobian`). A ``tf.Module`` or a restored SavedModel is
differentiated with ``tf.GradientTape`` with respect to its own trainable variables
(:mod:`cvcore.backends.keras.module`). TensorFlow's log noise is silenced while a kernel
is built (:mod:`cvcore.backends.keras.quiet`).

Importing this module imports neither TensorFlow, Keras, JAX nor torch.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from cvcore.backends.keras.jacobian import Engine, assemble, keras_engine
from cvcore.backends.keras.quiet import quiet_tensorflow
from cvcore.backends.keras.setup import (
    as_inputs,
    is_keras_layer,
    is_tf_trackable,
    keras_backend_name,
    keras_float64,
)

from cvcore.blocking import plan_blocks
from cvcore.data_io import batch_size, require_samples, slice_inputs
from cvcore.errors import ModelError
from cvcore.memory import ensure_fits
from cvcore.protocols import Implementation, KernelRequest, KernelResult, LayerKernels


class KerasBackend:
    """Backend for Keras 3 models and layers (on any Keras backend), ``tf.Module`` s and
    restored SavedModels."""

    name = "tensorflow"
    extra = "tensorflow"
    modules: tuple[str, ...] = ("keras", "tensorflow")

    def framework(self, model: Any) -> str:
        """``keras/<engine>`` for a Keras 3 model (the Keras backend it runs on), else
        ``tensorflow``."""
        import sys

        keras = sys.modules.get("keras")
        if keras is not None and isinstance(model, keras.Model):
            return f"keras/{keras.backend.backend()}"
        return self.name

    def available(self) -> bool:
        return (importlib.util.find_spec("keras") is not None
                or importlib.util.find_spec("tensorflow") is not None)

    def accepts(self, model: object) -> bool:
        return is_keras_layer(model) or is_tf_trackable(model)

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        with quiet_tensorflow():
            return self._run(model, inputs, request, diagonal=False)

    def diagonal(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray[Any, Any]:
        """``K_ii`` without building the kernel: traced ``(1/O) Σ_o ‖J_io‖²`` (N values),
        full ``‖J_io‖²`` (N·O values, row ``i·O + o``); their sum is ``Tr K``."""
        with quiet_tensorflow():
            return self._run(model, inputs, request, diagonal=True)

    def output_shape(self, model: Any, inputs: Any, request: KernelRequest) -> tuple[int, ...]:
        """One sample's output shape ``S`` (:class:`cvcore.protocols.JacobianBackend`)."""
        from cvcore.backends.keras.jacobian_sets import output_shape

        with quiet_tensorflow():
            if not is_keras_layer(model):
                return output_shape(model, inputs, request)
            with keras_float64(keras_backend_name(), request.dtype == "float64"):
                return output_shape(model, inputs, request)

    def jacobians(self, model: Any, input_sets: tuple[Any, ...], request: KernelRequest
                  ) -> Iterator[tuple[np.ndarray[Any, Any], ...]]:
        """Per parameter group, the per-sample Jacobians ``(N_s, *S, P_group)`` of each
        input set (cross kernels and output axes, :mod:`cvcore.cross`)."""
        from cvcore.backends.keras.jacobian_sets import jacobian_groups

        with quiet_tensorflow():
            if not is_keras_layer(model):
                yield from jacobian_groups(model, input_sets, request)
                return
            with keras_float64(keras_backend_name(), request.dtype == "float64"):
                yield from jacobian_groups(model, input_sets, request)

    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
        """Each layer's kernel: ``cvcore.protocols.LayerKernels`` (backends/keras/layers.py)."""
        from cvcore.backends.keras.layers import layer_kernels

        with quiet_tensorflow():
            return layer_kernels(model, inputs, request)

    def outputs(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray[Any, Any]:
        """The selected output ``(N, O)`` in the request's dtype, from the engine the kernel
        is built by: each sample alone in eval mode, one batch under ``train=True``
        (:class:`cvcore.protocols.OutputsBackend`)."""
        with quiet_tensorflow():
            x = as_inputs(inputs, request.dtype)
            require_samples(batch_size(x))
            if is_keras_layer(model):
                backend = keras_backend_name()
                with keras_float64(backend, request.dtype == "float64"):
                    if backend == "jax":
                        from cvcore.backends.jax.backend import JaxBackend
                        from cvcore.backends.keras.bridge import jax_pair

                        return JaxBackend().outputs(jax_pair(model, x, request), x, request)
                    if backend == "torch" and _torch_structured(model, request):
                        from cvcore.backends.keras.bridge import torch_module, torch_request
                        from cvcore.backends.torch.backend import TorchBackend

                        return TorchBackend().outputs(torch_module(model, x, request), x,
                                                      torch_request(request))
                    return _outputs_of(keras_engine(model, x, request, backend), x, request)
            if is_tf_trackable(model):
                from cvcore.backends.keras.module import module_engine

                return _outputs_of(module_engine(model, request), x, request)
        raise ModelError(
            "expected a Keras 3 layer / model, a tf.Module or a loaded SavedModel, got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )

    def _run(self, model: Any, inputs: Any, request: KernelRequest, diagonal: bool) -> Any:
        x = as_inputs(inputs, request.dtype)
        require_samples(batch_size(x))
        if is_keras_layer(model):
            backend = keras_backend_name()
            with keras_float64(backend, request.dtype == "float64"):
                if backend == "jax":
                    return _on_jax(model, x, request, diagonal)
                if backend == "torch" and _torch_structured(model, request):
                    return _on_torch(model, x, request, diagonal)
                return _measure(keras_engine(model, x, request, backend), x, request, diagonal)
        if is_tf_trackable(model):
            from cvcore.backends.keras.module import module_engine

            return _measure(module_engine(model, request), x, request, diagonal)
        raise ModelError(
            "expected a Keras 3 layer / model, a tf.Module or a loaded SavedModel, got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )


    # -- the framework chores the core asks of a backend (cvcore.capabilities) -----------

    def seed(self, seed: int) -> None:
        """Seed TensorFlow's and Keras' generators (whichever is imported)."""
        tf = sys.modules.get("tensorflow")
        if tf is not None and hasattr(tf, "random"):
            tf.random.set_seed(seed)
        keras = sys.modules.get("keras")
        if keras is not None and hasattr(keras, "utils") and hasattr(keras.utils,
                                                                      "set_random_seed"):
            keras.utils.set_random_seed(seed)

    def count_parameters(self, model: Any) -> int | None:
        """Trainable scalars: a Keras-on-torch model's ``parameters()``, else
        ``trainable_weights``."""
        params = getattr(model, "parameters", None)
        if callable(params):
            try:
                return int(sum(int(p.numel()) for p in params()
                               if getattr(p, "requires_grad", True)))
            except Exception:  # noqa: BLE001 - not a torch module after all
                return None
        weights = getattr(model, "trainable_weights", None)
        if weights is not None:
            return int(sum(int(np.prod(w.shape)) for w in weights))
        return None

    def take(self, inputs: Any, index: np.ndarray[Any, Any]) -> Any:
        """Rows ``index`` of a tensor (``tf.gather`` for a TensorFlow tensor)."""
        tf = sys.modules.get("tensorflow")
        if tf is not None and isinstance(inputs, tf.Tensor):
            return tf.gather(inputs, index)
        return inputs[index]

    def as_array(self, values: np.ndarray[Any, Any], like: Any) -> Any:
        """``values`` as an array of ``like``'s framework (TensorFlow, or torch / JAX
        under Keras on those), dtype and device."""
        module = type(like).__module__.split(".")[0]
        if module == "torch":
            return sys.modules["torch"].as_tensor(values, dtype=like.dtype, device=like.device)
        if module in ("jax", "jaxlib"):
            return sys.modules["jax.numpy"].asarray(values, dtype=like.dtype)
        if module in ("tensorflow", "keras"):
            return sys.modules["tensorflow"].constant(values, dtype=like.dtype)
        return np.asarray(values, dtype=getattr(like, "dtype", np.float64))



def _on_jax(model: Any, x: Any, request: KernelRequest, diagonal: bool) -> Any:
    """A Keras-on-JAX model measured by the JAX backend, as ``(apply_fn, theta)``."""
    from cvcore.backends.jax.backend import JaxBackend
    from cvcore.backends.keras.bridge import jax_pair

    pair = jax_pair(model, x, request)
    if diagonal:
        return JaxBackend().diagonal(pair, x, request)
    return JaxBackend().ntk(pair, x, request)


def _torch_structured(model: Any, request: KernelRequest) -> bool:
    """Whether a Keras-on-torch model goes to the torch structured engine: always under
    ``implementation="structured"``, never under ``"jacobian"``; under ``"auto"`` unless
    it has a convolution layer. Keras' convolutions on torch are cheaper through
    ``vmap(jacrev)`` of ``stateless_call``: MobileNetV2 at N = 16 took 8.6 CPU s there
    against 19.6 through the rules (docs/benchmarks.md), whose captures and row checks
    alone cost about as much as the whole Jacobian path."""
    from cvcore.backends.keras.jacobian import has_convolution

    if request.implementation == Implementation.AUTO:
        return not has_convolution(model)
    return bool(request.implementation == Implementation.STRUCTURED)


def _on_torch(model: Any, x: Any, request: KernelRequest, diagonal: bool) -> Any:
    """A Keras-on-torch model measured by the torch backend (structured engine, row
    checks, Jacobian path for the weights without a rule), as a module of its weights."""
    from cvcore.backends.keras.bridge import torch_module, torch_request
    from cvcore.backends.torch.backend import TorchBackend

    module = torch_module(model, x, request)
    on = torch_request(request)
    if diagonal:
        return TorchBackend().diagonal(module, x, on)
    return TorchBackend().ntk(module, x, on)


def _outputs_of(engine: Engine, x: Any, request: KernelRequest) -> np.ndarray[Any, Any]:
    """An engine's selected output ``(N, O)`` as NumPy: one forward per sample (eval mode,
    as the kernel differentiates it) or of the whole batch (train mode)."""
    native = engine.to_native(x)
    n = batch_size(x)
    parts = ([engine.forward(native)] if request.train
             else [engine.forward(slice_inputs(native, i, i + 1)) for i in range(n)])
    rows = [p.detach().cpu().numpy() if hasattr(p, "detach") else np.asarray(p) for p in parts]
    return np.concatenate([r.reshape(r.shape[0], -1) for r in rows]).reshape(n, -1)


def _measure(engine: Engine, x: Any, request: KernelRequest, diagonal: bool) -> Any:
    """The kernel (a :class:`KernelResult`) or its diagonal (NumPy) from an engine."""
    native = engine.to_native(x)
    n = batch_size(x)
    probe = engine.forward(slice_inputs(native, 0, 1))
    n_outputs = int(np.prod(probe.shape[1:]))
    if diagonal:
        from cvcore.backends.keras.diagonal import diagonal_of

        return diagonal_of(engine, native, request, n, n_outputs)
    ensure_fits(n, n_outputs, request.kernel, np.dtype(request.dtype).itemsize)
    plan = plan_blocks(n_samples=n, n_outputs=n_outputs, group_sizes=engine.sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    kernel = assemble(engine, native, request, plan, n_outputs)
    return KernelResult(kernel=kernel, n_samples=n, n_outputs=n_outputs,
                        n_params=sum(engine.sizes), device=engine.device)
