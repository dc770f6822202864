"""The ground of the Keras / TensorFlow backend: the frameworks, what a model is, inputs,
outputs, devices, the float64 scope, a model recast to another dtype (a fresh copy
re-created from its config with every floating dtype policy set to the requested one; the
user's model is untouched), and :func:`prepare`, which makes a Keras model a
:class:`Setup`: a function of its weights in the request's dtype on its device.

Importing this module imports neither TensorFlow, Keras, JAX nor torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cvcore import outputs
from cvcore.data_io import slice_inputs
from cvcore.errors import InputError, ModelError, describe, first_line
from cvcore.imports import require
from cvcore.protocols import KernelRequest, OutputSelector


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


def as_inputs(inputs: Any, dtype: str) -> Any:
    """Inputs as NumPy (nested dict / tuple kept); floating arrays cast to ``dtype``."""
    if isinstance(inputs, Mapping):
        return {k: as_inputs(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(as_inputs(v, dtype) for v in inputs)
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



# --------------------------------------------------------------------------- outputs


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(
        value, (Mapping, tuple, list))


def select_output(raw: Any, output: OutputSelector | None) -> Any:
    """Pick one tensor out of a model's raw output (see :func:`cvcore.outputs.select_output`);
    a complex one is refused (its Jacobian would be taken of the real part alone)."""
    chosen = outputs.select_output(raw, output, is_leaf=_is_tensor)
    dtype = str(getattr(chosen.dtype, "name", chosen.dtype)).removeprefix("torch.")
    if "complex" in dtype:
        raise ModelError(f"expected a real floating-point output to differentiate, got {dtype} "
                         "(take its abs, real or imaginary part in the model); pick another "
                         "output with output=")
    return chosen


def input_error(x: Any, exc: BaseException, model: Any = None) -> InputError:
    """A one-line error naming the model's input shape (when it declares one), the
    inputs' shapes and the framework's complaint."""
    declared = _declared_shape(model)
    wanted = f"inputs of shape {declared}" if declared else "inputs the model accepts"
    return InputError(f"expected {wanted}, got {shapes(x)}: {first_line(exc)}")


def _declared_shape(model: Any) -> str | None:
    try:
        shape = model.input_shape if model is not None else None
    except (AttributeError, ValueError, RuntimeError):
        return None
    return None if shape is None else str(shape)


# --------------------------------------------------------------------------- parameters


def check_real(names: list[str], dtypes: list[Any]) -> None:
    """Refuse a complex trainable variable (every engine differentiates real weights; a
    cast to the request's dtype would keep only the real part).

    >>> check_real(["dense/kernel"], ["float32"])
    >>> check_real(["c/w"], ["complex64"])
    Traceback (most recent call last):
    ...
    cvcore.errors.ModelError: expected real floating-point parameters, got complex64 in 'c/w'
    """
    for name, dtype in zip(names, dtypes):
        text = str(getattr(dtype, "name", dtype))
        if "complex" in text:
            raise ModelError(f"expected real floating-point parameters, got {text} in {name!r}")


# --------------------------------------------------------------------------- devices and dtype


def keras_backend_name() -> str:
    """The running Keras backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return str(require("keras", "tensorflow").backend.backend())


def keras_device(device: str | None, backend: str) -> str:
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
    return bool(require("tensorflow").config.list_logical_devices("GPU"))


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
            f"{backend} backend, got keras {require('keras', 'tensorflow').__version__}; use "
            "KERAS_BACKEND=tensorflow "
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


# --------------------------------------------------------------------------- recast

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


def layers_of(model: Any) -> list[Any]:
    """The model and every layer inside it."""
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten(include_self=True)) if flatten is not None else [model]


def needs_recast(model: Any, dtype: str) -> bool:
    """Whether the model computes or stores its floating weights in another dtype."""
    keras = require("keras", "tensorflow")
    for var in model.weights:
        if keras.backend.is_float_dtype(var.dtype) and keras.backend.standardize_dtype(
                var.dtype) != dtype:
            return True
    return any(getattr(layer, "compute_dtype", dtype) != dtype for layer in layers_of(model))


def recast(model: Any, first: Any, dtype: str) -> Any:
    """A fresh copy of ``model`` built in ``dtype`` from its config (the user's model is
    untouched); its weights are never used, only its variables' order and shapes."""
    keras = require("keras", "tensorflow")
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
        f"{type(model).__name__} ({first_line(exc)}); build it with dtype='{dtype}' or "
        f"measure with its own dtype"
    )


def check_weights(names: list[str], values: list[Any]) -> None:
    for name, value in zip(names, values):
        if not np.isfinite(to_numpy(value)).all():
            raise ModelError(f"expected finite weights, got NaN or Inf in variable {name!r}")


# --------------------------------------------------------------------------- setup


def keras_call_inputs(x: Any) -> Any:
    """Keras takes several inputs as a list."""
    return list(x) if isinstance(x, tuple) else x


@dataclasses.dataclass
class Setup:
    """A Keras model ready to measure (what :func:`prepare` returns), as a function of its
    weights: ``call(theta, batch)`` is the raw output
    of ``stateless_call`` with the trainable weights ``theta`` (non-trainable ones fixed).

    Attributes:
        call: ``call(theta, batch, fixed=None)``, batch as native tensors; ``fixed``
            replaces the non-trainable weights.
        theta: the trainable weights, cast to the request's dtype, in model order.
        fixed: the non-trainable weights, cast likewise.
        paths: the trainable variables' paths, for messages.
        device: the Keras device string the computation runs on.
        to_native: turns a NumPy batch into the Keras backend's tensors.
        runner: the model that runs: the user's, or a copy recast to the dtype.
        recast: whether ``runner`` is such a copy.
    """

    call: Callable[..., Any]
    theta: list[Any]
    fixed: list[Any]
    paths: list[str]
    device: str
    to_native: Callable[[Any], Any]
    runner: Any
    recast: bool


def prepare(model: Any, x: Any, request: KernelRequest, backend: str) -> Setup:
    """``model`` ready for ``stateless_call`` in the request's dtype and on its device (a
    recast copy when the model's own dtype differs; the user's model is untouched)."""
    keras = require("keras", "tensorflow")
    ops = keras.ops
    dtype = request.dtype
    device = keras_device(request.device, backend)
    trainable = list(model.trainable_variables)
    if not trainable:
        raise ModelError("expected a model with trainable variables, got none "
                         "(all frozen, or the model is not built)")
    check_real([str(v.path) for v in trainable], [v.dtype for v in trainable])
    with keras.device(device):
        def to_native(batch: Any) -> Any:
            return map_inputs(lambda a: ops.convert_to_tensor(a, dtype=str(a.dtype)), batch)

        runner = model
        if needs_recast(model, dtype):
            runner = recast(model, keras_call_inputs(to_native(slice_inputs(x, 0, 1))), dtype)

        def cast(v: Any) -> Any:
            value = ops.convert_to_tensor(v.value)
            return ops.cast(value, dtype) if keras.backend.is_float_dtype(v.dtype) else value

        theta = [cast(v) for v in trainable]
        fixed = [cast(v) for v in model.non_trainable_variables]
    paths = [v.path for v in trainable]
    check_weights(paths, theta)

    def call(params: list[Any], batch: Any, constants: list[Any] | None = None) -> Any:
        raw, _ = runner.stateless_call(list(params), fixed if constants is None else list(constants),
                                       keras_call_inputs(batch), training=request.train)
        return raw

    return Setup(call=call, theta=theta, fixed=fixed, paths=paths, device=device,
                     to_native=to_native, runner=runner, recast=runner is not model)
