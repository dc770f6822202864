"""The TensorFlow / Keras backend: Keras 3 models on any Keras backend, ``tf.Module`` s and
restored SavedModels.

A Keras model is measured through ``model.stateless_call(trainable, non_trainable, x)``
with the weights passed in as plain tensors, so the user's model is never modified, and
differentiated with the autodiff of the Keras backend that runs it (``tf.GradientTape``,
``jax.jacrev`` or ``torch.func.jacrev``). A ``tf.Module`` or a restored SavedModel is
differentiated with ``tf.GradientTape`` with respect to its own trainable variables.

Importing this module imports neither TensorFlow, Keras, JAX nor torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cvcore import outputs
from cvcore.data_io import slice_inputs
from cvcore.blocking import Plan, plan_blocks
from cvcore.errors import InputError, MissingFrameworkError, ModelError, describe
from cvcore.protocols import KernelRequest, KernelResult, OutputSelector


def _tf() -> Any:
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingFrameworkError("tensorflow", "tensorflow") from None
    return tf


def _keras() -> Any:
    try:
        import keras
    except ImportError:
        raise MissingFrameworkError("keras", "tensorflow") from None
    return keras


def is_keras_layer(model: object) -> bool:
    """A Keras 3 layer or model (without importing Keras when it is not loaded)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.layers.Layer)


def is_tf_trackable(model: object) -> bool:
    """A ``tf.Module`` or an object restored by ``tf.saved_model.load``."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    if isinstance(model, tf.Module):
        return True
    return type(model).__module__.startswith("tensorflow.") and hasattr(
        model, "_trackable_children")


# --------------------------------------------------------------------------- inputs


def to_numpy(value: Any) -> np.ndarray[Any, Any]:
    """A framework tensor or array as NumPy (moved to the host)."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    return np.asarray(value)


def as_arrays(inputs: Any, dtype: str) -> Any:
    """Inputs as NumPy (nested dict / tuple kept); floating arrays cast to ``dtype``."""
    if isinstance(inputs, Mapping):
        return {k: as_arrays(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(as_arrays(v, dtype) for v in inputs)
    try:
        array = to_numpy(inputs)
    except (TypeError, ValueError, RuntimeError):
        array = None
    if array is None or array.dtype == object or array.ndim == 0:
        raise InputError(
            "expected inputs as an array or tensor with a batch dimension, or a dict / tuple "
            f"of them, got {describe(inputs)}"
        )
    return array.astype(dtype) if np.issubdtype(array.dtype, np.floating) else array


def map_inputs(fn: Callable[[Any], Any], inputs: Any) -> Any:
    """Apply ``fn`` to every array in a nested dict / tuple."""
    if isinstance(inputs, Mapping):
        return {k: map_inputs(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(map_inputs(fn, v) for v in inputs)
    return fn(inputs)


def shapes(x: Any) -> str:
    """Per-sample shapes of a batch, for error messages."""
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {shapes(v)}" for k, v in x.items()) + "}"
    if isinstance(x, tuple):
        return "(" + ", ".join(shapes(v) for v in x) + ")"
    return f"a batch of per-sample shape {tuple(x.shape[1:])} ({getattr(x.dtype, 'name', x.dtype)})"


def batch_of(inputs: Any) -> int:
    from cvcore.data_io import batch_size

    return batch_size(inputs)


# --------------------------------------------------------------------------- outputs


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(
        value, (Mapping, tuple, list))


def select_output(raw: Any, output: OutputSelector | None) -> Any:
    """Pick one tensor out of a model's raw output (see :func:`cvcore.outputs.select_output`)."""
    return outputs.select_output(raw, output, is_leaf=_is_tensor)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def input_error(x: Any, exc: BaseException, model: Any = None) -> InputError:
    """A one-line error naming the model's input shape (when it declares one), the
    inputs' shapes and the framework's complaint."""
    declared = _declared_shape(model)
    wanted = f"inputs of shape {declared}" if declared else "inputs the model accepts"
    return InputError(f"expected {wanted}, got {shapes(x)}: {_first_line(exc)}")


def _declared_shape(model: Any) -> str | None:
    try:
        shape = model.input_shape if model is not None else None
    except (AttributeError, ValueError, RuntimeError):
        return None
    return None if shape is None else str(shape)


# --------------------------------------------------------------------------- engines


@dataclasses.dataclass
class Engine:
    """One model made ready for one framework's autodiff.

    Attributes:
        sizes: number of scalars in each trainable tensor, in model order.
        forward: ``forward(x) -> (b, O)`` native tensor of the selected output.
        jacobian: ``jacobian(members, x) -> (b, O, P_group)`` native tensor, the
            per-sample Jacobian with respect to the trainable tensors ``members``.
        gram: ``gram(a, b) -> a @ b.T`` as NumPy, for 2-D native tensors.
        to_native: turns a NumPy batch into the framework's tensors.
        device: the device the computation runs on.
    """

    sizes: list[int]
    forward: Callable[[Any], Any]
    jacobian: Callable[[tuple[int, ...], Any], Any]
    gram: Callable[[Any, Any], np.ndarray[Any, Any]]
    to_native: Callable[[Any], Any]
    device: str
    reshape: Callable[[Any, tuple[int, ...]], Any]
    concat: Callable[[list[Any]], Any]


def keras_backend_name() -> str:
    """The running Keras backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return str(_keras().backend.backend())


def _keras_device(device: str | None, backend: str) -> str:
    """A Keras device string (``"cpu:0"``, ``"gpu:0"``): ``device`` or the GPU if visible."""
    if device is None:
        return "gpu:0" if _gpu_visible(backend) else "cpu:0"
    text = device.strip().lower().lstrip("/").replace("device:", "")
    kind, _, index = text.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()):
        raise InputError(f"expected a device such as 'cpu', 'gpu' or 'gpu:1', got {device!r}")
    if kind == "gpu" and not _gpu_visible(backend):
        raise InputError(f"expected a visible GPU for device={device!r}, got none")
    return f"{kind}:{index or 0}"


def _gpu_visible(backend: str) -> bool:
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return bool(_tf().config.list_logical_devices("GPU"))


@contextlib.contextmanager
def keras_float64(backend: str, wanted: bool) -> Iterator[None]:
    """Let Keras compute in float64 on the jax and torch backends, for this block only.

    Keras 3 promotes dtypes like JAX without x64: ``keras.backend.result_type`` maps
    float64 to float32 on every backend but TensorFlow (its ``BIT64_TO_BIT32_DTYPE``
    table), so ``ops.matmul`` of two float64 tensors returns float32 there. This lifts
    that one entry (and turns on ``jax_enable_x64``) while the kernel is built.
    """
    if not wanted or backend == "tensorflow":
        yield
        return
    try:
        from keras.src.backend.common import dtypes as keras_dtypes

        table = keras_dtypes.BIT64_TO_BIT32_DTYPE
    except (ImportError, AttributeError):
        raise ModelError(
            f"expected a Keras version whose float64 promotion cvcore can lift on the "
            f"{backend} backend, got keras {_keras().__version__}; use KERAS_BACKEND=tensorflow "
            "or dtype='float32'"
        ) from None
    saved = table.get("float64")
    table["float64"] = "float64"
    try:
        if backend == "jax":
            import jax

            with jax.enable_x64(True):
                yield
        else:
            yield
    finally:
        table["float64"] = saved


class KerasBackend:
    """Backend for Keras 3 models and layers (on any Keras backend), ``tf.Module`` s and
    restored SavedModels."""

    name = "tensorflow"
    extra = "tensorflow"
    modules = ("keras", "tensorflow")

    def available(self) -> bool:
        return (importlib.util.find_spec("keras") is not None
                or importlib.util.find_spec("tensorflow") is not None)

    def accepts(self, model: object) -> bool:
        return is_keras_layer(model) or is_tf_trackable(model)

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        x = as_arrays(inputs, request.dtype)
        n = batch_of(x)
        if n == 0:
            raise InputError("expected at least one input sample, got an empty batch")
        if is_keras_layer(model):
            backend = keras_backend_name()
            with keras_float64(backend, request.dtype == "float64"):
                return self._measure(model, x, request, backend)
        if is_tf_trackable(model):
            return self._measure(model, x, request, "tf.Module")
        raise ModelError(
            "expected a Keras 3 layer / model, a tf.Module or a loaded SavedModel, got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )

    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> Any:
        """Each layer's kernel: ``cvcore.protocols.LayerKernels`` (backends/tf_per_layer.py)."""
        from cvcore.backends.tf_per_layer import layer_kernels

        return layer_kernels(model, inputs, request)

    def _measure(self, model: Any, x: Any, request: KernelRequest, kind: str) -> KernelResult:
        if kind == "tf.Module":
            engine = module_engine(model, request)
        else:
            engine = keras_engine(model, x, request, kind)
        native = engine.to_native(x)
        probe = engine.forward(slice_inputs(native, 0, 1))
        n_outputs = int(np.prod(probe.shape[1:]))
        plan = plan_blocks(n_samples=batch_of(x), n_outputs=n_outputs, group_sizes=engine.sizes,
                           itemsize=np.dtype(request.dtype).itemsize,
                           budget=request.memory_budget)
        kernel = assemble(engine, native, request, plan, n_outputs)
        return KernelResult(kernel=kernel, n_samples=batch_of(x), n_outputs=n_outputs,
                            n_params=sum(engine.sizes), device=engine.device)


#: The protocol's name for it; ``TFBackend`` is the same class.
TFBackend = KerasBackend


def assemble(engine: Engine, x: Any, request: KernelRequest, plan: Plan,
             n_outputs: int) -> np.ndarray[Any, Any]:
    """Sum ``J_g J_gᵀ`` over parameter groups and pairs of sample blocks (NumPy kernel,
    products on the framework's device)."""
    n = batch_of(x)
    traced = request.kernel == "traced"
    width = 1 if traced else n_outputs
    kernel = np.zeros((n * width, n * width), dtype=request.dtype)
    scale = 1.0 / n_outputs if traced else 1.0

    def rows(members: tuple[int, ...], start: int, stop: int) -> Any:
        parts = [engine.jacobian(members, slice_inputs(x, a, b))
                 for a, b in plan.chunks(_group(plan, members), start, stop)]
        j = parts[0] if len(parts) == 1 else engine.concat(parts)
        b, o, p = (int(s) for s in j.shape)
        return engine.reshape(j, (b, o * p) if traced else (b * o, p))

    for group in plan.groups:
        blocks = plan.sample_blocks(group)
        for bi, (a0, a1) in enumerate(blocks):
            ja = rows(group.members, a0, a1)
            kernel[a0 * width:a1 * width, a0 * width:a1 * width] += scale * engine.gram(ja, ja)
            for b0, b1 in blocks[bi + 1:]:
                block = scale * engine.gram(ja, rows(group.members, b0, b1))
                kernel[a0 * width:a1 * width, b0 * width:b1 * width] += block
                kernel[b0 * width:b1 * width, a0 * width:a1 * width] += block.T
    check_finite(kernel, n, width)
    return kernel


def _group(plan: Plan, members: tuple[int, ...]) -> Any:
    return next(g for g in plan.groups if g.members == members)


def check_finite(kernel: np.ndarray[Any, Any], n: int, width: int) -> None:
    """Raise naming the samples whose outputs or gradients are NaN / Inf."""
    bad = ~np.isfinite(np.diagonal(kernel))
    if bad.any():
        samples = sorted({int(i) // width for i in np.flatnonzero(bad)})
        shown = ", ".join(map(str, samples[:10])) + (" ..." if len(samples) > 10 else "")
        raise ModelError(
            f"expected finite outputs and gradients, got NaN/Inf for {len(samples)} of {n} "
            f"samples (indices {shown})"
        )


# --------------------------------------------------------------------------- Keras models

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16")


def _set_dtype(config: Any, dtype: str) -> Any:
    """A serialized Keras config with every floating dtype / dtype policy set to ``dtype``."""
    if isinstance(config, list):
        return [_set_dtype(v, dtype) for v in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype" and isinstance(value, str) and value in _FLOAT_DTYPES:
            value = dtype
        elif key == "dtype" and isinstance(value, dict) and str(
                value.get("class_name", "")).endswith("DTypePolicy"):
            value = {"module": "keras", "class_name": "DTypePolicy",
                     "config": {"name": dtype}, "registered_name": None}
        else:
            value = _set_dtype(value, dtype)
        out[key] = value
    return out


def _layers(model: Any) -> list[Any]:
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten(include_self=True)) if flatten is not None else [model]


def needs_recast(model: Any, dtype: str) -> bool:
    """Whether the model computes or stores its floating weights in another dtype."""
    keras = _keras()
    for var in model.weights:
        if keras.backend.is_float_dtype(var.dtype) and keras.backend.standardize_dtype(
                var.dtype) != dtype:
            return True
    return any(getattr(layer, "compute_dtype", dtype) != dtype for layer in _layers(model))


def recast(model: Any, first: Any, dtype: str) -> Any:
    """A fresh copy of ``model`` built in ``dtype`` from its config (the user's model is
    untouched); its weights are never used, only its variables' order and shapes."""
    keras = _keras()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns about serializing a lambda
            config = _set_dtype(keras.saving.serialize_keras_object(model), dtype)
    except Exception as exc:  # noqa: BLE001 - no get_config: one line
        raise _recast_error(model, dtype, exc) from None
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)  # sub-layers built without an explicit dtype
    try:
        clone = _deserialize(keras, config)
        if not clone.built:
            clone(first)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild: one line
        raise _recast_error(model, dtype, exc) from None
    finally:
        keras.config.set_dtype_policy(previous)
    ours = [tuple(v.shape) for v in model.trainable_variables + model.non_trainable_variables]
    theirs = [tuple(v.shape) for v in clone.trainable_variables + clone.non_trainable_variables]
    if ours != theirs:
        raise ModelError(
            f"expected a {dtype} copy of the model with the same variables, got shapes "
            f"{theirs[:6]} instead of {ours[:6]}; build the model with dtype='{dtype}'"
        )
    return clone


def _deserialize(keras: Any, config: Any) -> Any:
    """Re-create a model from the config just taken from the live object.

    ``safe_mode=True`` unless the config holds a Python ``lambda`` (an ``Activation`` or
    ``Lambda`` layer): that bytecode was marshalled from the user's own function a moment
    ago, in this process, and is re-created with ``safe_mode=False``. No file is involved:
    a model loaded from a file without ``--trust`` never has such a function (the loaders
    refuse it).
    """
    return keras.saving.deserialize_keras_object(config, safe_mode=not _has_lambda(config))


def _has_lambda(config: Any) -> bool:
    if isinstance(config, list):
        return any(_has_lambda(v) for v in config)
    if isinstance(config, dict):
        return config.get("class_name") == "__lambda__" or any(
            _has_lambda(v) for v in config.values())
    return False


def _recast_error(model: Any, dtype: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"expected a Keras model that can be re-created in {dtype} from its config, got "
        f"{type(model).__name__} ({_first_line(exc)}); build it with dtype='{dtype}' or "
        f"measure with its own dtype"
    )


def _check_weights(names: list[str], values: list[Any]) -> None:
    for name, value in zip(names, values):
        if not np.isfinite(to_numpy(value)).all():
            raise ModelError(f"expected finite weights, got NaN or Inf in variable {name!r}")


def _keras_call_inputs(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def keras_engine(model: Any, x: Any, request: KernelRequest, backend: str) -> Engine:
    """An engine for a Keras 3 model on the running Keras backend."""
    keras = _keras()
    ops = keras.ops
    dtype = request.dtype
    device = _keras_device(request.device, backend)
    trainable = list(model.trainable_variables)
    if not trainable:
        raise ModelError("expected a model with trainable variables, got none "
                         "(all frozen, or the model is not built)")
    with keras.device(device):
        def to_native(batch: Any) -> Any:
            return map_inputs(lambda a: ops.convert_to_tensor(a, dtype=str(a.dtype)), batch)

        runner = model
        if needs_recast(model, dtype):
            runner = recast(model, _keras_call_inputs(to_native(slice_inputs(x, 0, 1))), dtype)

        def cast(v: Any) -> Any:
            value = ops.convert_to_tensor(v.value)
            return ops.cast(value, dtype) if keras.backend.is_float_dtype(v.dtype) else value

        theta = [cast(v) for v in trainable]
        fixed = [cast(v) for v in model.non_trainable_variables]
    _check_weights([v.path for v in trainable], theta)

    def apply(params: list[Any], batch: Any) -> Any:
        raw, _ = runner.stateless_call(params, fixed, _keras_call_inputs(batch),
                                       training=request.train)
        out = select_output(raw, request.output)
        return ops.reshape(out, (out.shape[0], -1))

    def forward(batch: Any) -> Any:
        try:
            with keras.device(device):
                return apply(theta, batch)
        except (ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise input_error(batch, exc, model) from exc
        except Exception as exc:  # tf.errors.* are not ValueErrors
            if type(exc).__module__.startswith("tensorflow"):
                raise input_error(batch, exc, model) from exc
            raise

    make = {"tensorflow": _tf_jacobian, "jax": _jax_jacobian, "torch": _torch_jacobian}[backend]
    jacobian = make(apply, theta, request.train)

    def in_device(members: tuple[int, ...], batch: Any) -> Any:
        with keras.device(device):
            return jacobian(members, batch)

    glue = _GLUE[backend]()
    return Engine(sizes=[int(np.prod(v.shape)) for v in trainable], forward=forward,
                  jacobian=in_device, gram=glue[0], to_native=to_native, device=device,
                  reshape=glue[1], concat=glue[2])


def _tf_glue() -> tuple[Any, Any, Any]:
    tf = _tf()
    return (lambda a, b: tf.matmul(a, b, transpose_b=True).numpy(),
            lambda t, s: tf.reshape(t, s), lambda ts: tf.concat(ts, axis=0))


def _jax_glue() -> tuple[Any, Any, Any]:
    import jax.numpy as jnp

    return (lambda a, b: np.asarray(a @ b.T), lambda t, s: jnp.reshape(t, s),
            lambda ts: jnp.concatenate(ts, axis=0))


def _torch_glue() -> tuple[Any, Any, Any]:
    import torch

    return (lambda a, b: (a @ b.T).detach().cpu().numpy(), lambda t, s: t.reshape(s),
            lambda ts: torch.cat(ts, dim=0))


_GLUE = {"tensorflow": _tf_glue, "jax": _jax_glue, "torch": _torch_glue, "tf.Module": _tf_glue}

#: How GradientTape Jacobians are vectorized: ``"per-sample"`` runs ``tape.jacobian``
#: (pfor over the O outputs) inside ``tf.vectorized_map`` over samples, batch size one
#: each; ``"batched"`` runs one ``tape.jacobian`` of the (b, O) batch output (pfor over
#: b·O rows, each a backward pass through the whole block). Eval mode uses per-sample
#: (measured faster, see docs/backend-tensorflow.md); train mode must use batched, since
#: batch statistics couple the samples.
TF_VECTORIZE = "per-sample"


class _RetracingFilter(logging.Filter):
    """Drops TensorFlow's retracing warning: each kernel builds fresh ``tf.function`` s
    around that call's weights, so their count grows by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def quiet_retracing() -> None:
    """Install :class:`_RetracingFilter` on the ``tensorflow`` logger, once."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _RetracingFilter) for f in logger.filters):
        logger.addFilter(_RetracingFilter())


def _merge(theta: list[Any], members: tuple[int, ...], group: list[Any]) -> list[Any]:
    full = list(theta)
    for k, i in enumerate(members):
        full[i] = group[k]
    return full


def _tape_jacobian(call: Callable[[tuple[int, ...], list[Any], Any], Any],
                   group_of: Callable[[tuple[int, ...]], list[Any]], train: bool,
                   device: str | None = None) -> Callable[[tuple[int, ...], Any], Any]:
    """GradientTape Jacobians of ``call(members, group, batch) -> (b, O)`` w.r.t. ``group``,
    one ``tf.function`` per parameter group: per-sample ``vectorized_map`` of pfor
    Jacobians in eval mode, one batched Jacobian in train mode (or ``TF_VECTORIZE``)."""
    tf = _tf()
    quiet_retracing()
    cache: dict[tuple[int, ...], Any] = {}

    def flat(js: list[Any], lead: int) -> Any:
        return tf.concat([tf.reshape(j, tf.concat([tf.shape(j)[:lead], [-1]], 0)) for j in js],
                         axis=lead)

    def build(members: tuple[int, ...]) -> Any:
        group = group_of(members)

        def jac(batch: Any, lead: int, squeeze: bool) -> Any:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(group)
                out = call(members, group, batch)
                if squeeze:
                    out = out[0]
            return flat(tape.jacobian(out, group, experimental_use_pfor=True,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO), lead)

        def per_sample(xi: Any) -> Any:
            return jac(tf.nest.map_structure(lambda t: t[None], xi), 1, True)

        if train or TF_VECTORIZE == "batched":
            return tf.function(lambda batch: jac(batch, 2, False), reduce_retracing=True)
        return tf.function(lambda batch: tf.vectorized_map(per_sample, batch),
                           reduce_retracing=True)

    def jacobian(members: tuple[int, ...], batch: Any) -> Any:
        if members not in cache:
            cache[members] = build(members)
        if device is None:
            return cache[members](batch)
        with tf.device(device):
            return cache[members](batch)

    return jacobian


def _tf_jacobian(apply: Callable[[list[Any], Any], Any], theta: list[Any],
                 train: bool) -> Callable[[tuple[int, ...], Any], Any]:
    """GradientTape Jacobians of a Keras model's stateless call (TensorFlow backend)."""
    return _tape_jacobian(lambda members, group, batch: apply(_merge(theta, members, group), batch),
                          lambda members: [theta[i] for i in members], train)


def _jax_jacobian(apply: Callable[[list[Any], Any], Any], theta: list[Any],
                  train: bool) -> Callable[[tuple[int, ...], Any], Any]:
    """``jax.jacrev``, vmapped over samples (eval) or of the batch (train), jitted."""
    import jax
    import jax.numpy as jnp

    cache: dict[tuple[int, ...], Any] = {}

    def build(members: tuple[int, ...]) -> Any:
        def single(group: list[Any], xi: Any) -> Any:
            batch = jax.tree_util.tree_map(lambda t: t[None], xi)
            return apply(_merge(theta, members, group), batch)[0]

        def batched(group: list[Any], batch: Any) -> Any:
            return apply(_merge(theta, members, group), batch)

        if train:
            fn = jax.jacrev(batched)
        else:
            fn = jax.vmap(jax.jacrev(single), in_axes=(None, 0))

        def run(group: list[Any], batch: Any) -> Any:
            js = fn(group, batch)
            return jnp.concatenate([j.reshape(j.shape[0], j.shape[1], -1) for j in js], axis=2)

        return jax.jit(run)

    def jacobian(members: tuple[int, ...], batch: Any) -> Any:
        if members not in cache:
            cache[members] = build(members)
        return cache[members]([theta[i] for i in members], batch)

    return jacobian


def _torch_jacobian(apply: Callable[[list[Any], Any], Any], theta: list[Any],
                    train: bool) -> Callable[[tuple[int, ...], Any], Any]:
    """``torch.func.jacrev`` on the Keras call (``functional_call`` would see no
    parameters), vmapped over samples (eval) or of the batch (train)."""
    import torch
    from torch.func import jacrev, vmap

    theta = [t.detach() for t in theta]

    def jacobian(members: tuple[int, ...], batch: Any) -> Any:
        group = [theta[i] for i in members]

        def single(g: list[Any], xi: Any) -> Any:
            b = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), xi)
            return apply(_merge(theta, members, g), b)[0]

        def batched(g: list[Any]) -> Any:
            return apply(_merge(theta, members, g), batch)

        js = jacrev(batched)(group) if train else vmap(jacrev(single), in_dims=(None, 0))(
            group, batch)
        return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in js], dim=2).detach()

    return jacobian


# --------------------------------------------------------------------------- tf.Module


def trainable_variables(obj: Any) -> list[tuple[str, Any]]:
    """Trainable ``tf.Variable`` s of a tf.Module or restored SavedModel, with paths,
    each once, in tracking order."""
    tf = _tf()
    if isinstance(obj, tf.Module) and not hasattr(obj, "_trackable_saved_model_saver"):
        return [(v.name, v) for v in obj.trainable_variables]
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def walk(node: Any, path: str) -> None:
        for name, child in node._trackable_children().items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            where = f"{path}.{name}" if path else name
            if isinstance(child, tf.Variable):
                if child.trainable:
                    found.append((where, child))
            else:
                walk(child, where)

    walk(obj, "")
    return found


def module_callable(obj: Any) -> Callable[[Any], Any]:
    """How to call a tf.Module / SavedModel on a batch: ``obj(x)``, ``obj.serve(x)``, or
    its ``serving_default`` signature (inputs by name)."""
    if callable(obj):
        return lambda x: _call(obj, x)
    serve = getattr(obj, "serve", None)
    if callable(serve):
        return lambda x: _call(serve, x)
    signatures = getattr(obj, "signatures", None) or {}
    if "serving_default" in signatures:
        sig = signatures["serving_default"]
        names = list(sig.structured_input_signature[1])

        def by_name(x: Any) -> Any:
            if isinstance(x, Mapping):
                return sig(**x)
            xs = x if isinstance(x, tuple) else (x,)
            if len(xs) != len(names):
                raise InputError(f"expected {len(names)} inputs named {names}, got {len(xs)}")
            return sig(**dict(zip(names, xs)))

        return by_name
    raise ModelError(
        f"expected a callable tf.Module, or a SavedModel with a 'serve' function or a "
        f"'serving_default' signature, got {type(obj).__name__} with signatures {list(signatures)}"
    )


def _call(fn: Any, x: Any) -> Any:
    if isinstance(x, Mapping):
        return fn(**x)
    if isinstance(x, tuple):
        return fn(*x)
    return fn(x)


def module_engine(model: Any, request: KernelRequest) -> Engine:
    """An engine for a tf.Module or a restored SavedModel: GradientTape with respect to
    its own trainable variables, in their dtype."""
    tf = _tf()
    found = trainable_variables(model)
    if not found:
        raise ModelError(
            f"expected a {type(model).__name__} with trainable variables, got none "
            "(a SavedModel keeps variables only if they were tracked, and their trainable flag)"
        )
    names = [n for n, _ in found]
    variables = [v for _, v in found]
    dtypes = sorted({v.dtype.name for v in variables if v.dtype.is_floating})
    if dtypes != [request.dtype]:
        raise ModelError(
            f"expected dtype= matching the module's trainable variables ({', '.join(dtypes)}), "
            f"got {request.dtype}; a tf.Module computes in its variables' dtype"
        )
    _check_weights(names, [v.numpy() for v in variables])
    keras_device = _keras_device(request.device, "tensorflow")
    device = "/" + keras_device.upper()
    call = module_callable(model)
    quiet_retracing()

    def apply(batch: Any) -> Any:
        out = select_output(call(batch), request.output)
        return tf.reshape(out, [tf.shape(out)[0], -1])

    def forward(batch: Any) -> Any:
        try:
            with tf.device(device):
                return apply(batch)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise input_error(batch, exc) from exc

    jacobian = _tape_jacobian(lambda members, group, batch: apply(batch),
                              lambda members: [variables[i] for i in members], request.train,
                              device)

    def to_native(batch: Any) -> Any:
        with tf.device(device):
            return map_inputs(tf.convert_to_tensor, batch)

    glue = _tf_glue()
    return Engine(sizes=[int(np.prod(v.shape)) for v in variables], forward=forward,
                  jacobian=jacobian, gram=glue[0], to_native=to_native, device=keras_device,
                  reshape=glue[1], concat=glue[2])
