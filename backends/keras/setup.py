"""The ground of the Keras / TensorFlow backend: the frameworks, what a model is, inputs,
outputs, devices and the float64 scope.

Importing this module imports neither TensorFlow, Keras, JAX nor torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cvcore import outputs
from cvcore.errors import InputError, ModelError, describe
from cvcore.imports import require
from cvcore.protocols import OutputSelector


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


