"""The JAX backend's ground floor for a request: inputs, devices, dtypes, the :class:`Setup`.

:func:`prepare` turns a model (one of the forms of :mod:`cvcore.backends.jax.forms`) and
its inputs into a :class:`Setup`: the model as a pure function with its leaves in the
request's dtype on its device, the inputs as arrays, ``N``, and ``O`` (read off the
one-sample trace, :func:`cvcore.backends.jax.jaxpr.probe_outputs`). Also here: the
dtype / device / precision scope of every measurement (:func:`scope`). It imports only
:mod:`forms` and :mod:`jaxpr` of the JAX backend, and no JAX at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cvcore.data_io import batch_size, require_samples
from cvcore.errors import InputError, describe
from cvcore.imports import require
from cvcore.protocols import KernelRequest

from .forms import Leaves, Prepared, flatten_params, is_inexact, prepare_model
from .jaxpr import probe_outputs

if TYPE_CHECKING:
    import jax


# --------------------------------------------------------------------------- inputs


def as_inputs(inputs: Any, dtype: Any, device: jax.Device) -> Any:
    """Arrays (or a dict / tuple of them) on ``device``; floating ones in ``dtype``."""
    jax = require("jax")
    if isinstance(inputs, Mapping):
        return {k: as_inputs(v, dtype, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(as_inputs(v, dtype, device) for v in inputs)
    if not isinstance(inputs, jax.Array):
        if not hasattr(inputs, "__array__") and not isinstance(inputs, np.ndarray):
            raise InputError(
                "expected inputs as an array, or a dict / tuple of arrays, "
                f"got {describe(inputs)}"
            )
        inputs = np.asarray(inputs)
        if inputs.dtype == object:
            raise InputError(f"expected a numeric array as inputs, got {describe(inputs)}")
    if np.issubdtype(inputs.dtype, np.floating):
        inputs = inputs.astype(dtype)
    return jax.device_put(inputs, device)


def cast_tree(tree: Any, dtype: Any, device: jax.Device) -> Any:
    """Real floating array leaves in ``dtype`` on ``device``; other leaves unchanged (a
    complex leaf keeps its dtype: casting it would drop its imaginary part, and a complex
    parameter is refused by :func:`flatten_params`)."""
    jax = require("jax")

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, (np.ndarray, jax.Array)) and is_inexact(leaf) \
                and not np.issubdtype(leaf.dtype, np.complexfloating):
            return jax.device_put(leaf.astype(dtype), device)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def pad_batch(x: Any, size: int) -> Any:
    """Repeat the last sample until the batch has ``size`` samples."""
    jax = require("jax")
    import jax.numpy as jnp

    def pad(a: Any) -> Any:
        missing = size - a.shape[0]
        return a if missing <= 0 else jnp.concatenate([a, jnp.repeat(a[-1:], missing, axis=0)])

    return jax.tree_util.tree_map(pad, x)


# --------------------------------------------------------------------------- device, dtype


def resolve_device(device: str | None) -> Any:
    """The JAX device for ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"cuda:1"``, ``"tpu:0"`` ...;
    ``None`` is JAX's default device (the accelerator when one is visible)."""
    jax = require("jax")
    if device is None:
        return jax.devices()[0]
    kind, _, index = device.strip().lower().partition(":")
    platform = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(kind)
    if platform is None or (index and not index.isdigit()):
        raise InputError(f"expected a device such as 'cpu', 'gpu', 'cuda' or 'cuda:1', got {device!r}")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        visible = sorted({d.platform for d in jax.devices()})
        raise InputError(
            f"expected a visible {kind} device for device={device!r}, got none (visible: {visible})"
        ) from None
    i = int(index) if index else 0
    if i >= len(devices):
        raise InputError(f"expected a {kind} index below {len(devices)}, got {device!r}")
    return devices[i]


def device_name(device: jax.Device) -> str:
    """``"cpu"`` or ``"<platform>:<index>"`` for a JAX device."""
    return "cpu" if device.platform == "cpu" else f"{device.platform}:{device.id}"


@contextlib.contextmanager
def x64_scope(enabled: bool) -> Iterator[None]:
    """Enable 64-bit types for the duration of the block only (thread-local), leaving the
    user's global ``jax_enable_x64`` setting as it was."""
    jax = require("jax")
    if not enabled:
        yield
        return
    scope: Any = getattr(jax, "enable_x64", None)
    if scope is None:  # older jax kept the context manager in jax.experimental
        scope = importlib.import_module("jax.experimental").enable_x64
    with scope(True):
        yield


@contextlib.contextmanager
def scope(request: KernelRequest, device: jax.Device) -> Iterator[None]:
    """The request's dtype (``jax.enable_x64`` for float64, restored afterwards), its
    device, and ``jax.default_matmul_precision("highest")``: every measurement runs in it."""
    jax = require("jax")
    with x64_scope(request.dtype == "float64"), jax.default_device(device), \
            jax.default_matmul_precision("highest"):
        yield


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """A model and its inputs ready to measure: the prepared model and its leaves in the
    request's dtype on its device, the inputs as arrays, ``N``, ``O``, the leaves' sizes."""

    prep: Prepared
    leaves: Leaves
    x: Any
    n: int
    n_outputs: int
    sizes: list[int]
    #: the dtype (``jnp.float32`` / ``jnp.float64``) and the JAX device of the computation
    dtype: Any = None
    device: jax.Device | None = None


def prepare(model: Any, inputs: Any, request: KernelRequest, device: jax.Device,
            train: bool) -> Setup:
    """Prepare the model and inputs for ``request`` (call inside :func:`scope`)."""
    import jax.numpy as jnp

    dtype = jnp.float64 if request.dtype == "float64" else jnp.float32
    prep = prepare_model(model, train)
    prep.params = cast_tree(prep.params, dtype, device)
    prep.constants = cast_tree(prep.constants, dtype, device)
    leaves = flatten_params(prep.params)
    x = as_inputs(inputs, dtype, device)
    n = batch_size(x)
    require_samples(n)
    n_outputs = probe_outputs(prep, leaves, x, request.output)
    sizes = [int(leaves.values[i].size) for i in leaves.trainable]
    return Setup(prep, leaves, x, n, n_outputs, sizes, dtype, device)


def batch_first_model(model: Any, in_axes: Any, out_axis: int) -> Any:
    """An ``(apply_fn, params)`` model wrapped to take batch-first inputs and return a
    batch-first output (neural-tangents' ``vmap_axes``, :mod:`cvcore.batch_axes`); other
    model forms are refused (write them as ``(apply_fn, params)``)."""
    import jax.numpy as jnp

    if not (isinstance(model, tuple) and len(model) == 2 and callable(model[0])):
        raise InputError(f"expected an (apply_fn, params) pair with vmap_axes, got "
                         f"{describe(model)}")
    fn, params = model

    def back(a: Any, axis: Any) -> Any:
        return a if axis in (0, None) else jnp.moveaxis(a, 0, int(axis))

    def apply_fn(p: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            named = in_axes if isinstance(in_axes, Mapping) else dict.fromkeys(kwargs, in_axes)
            out = fn(p, **{k: back(v, named.get(k, 0)) for k, v in kwargs.items()})
        else:
            each = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
            out = fn(p, *(back(v, a) for v, a in zip(args, each)))
        return jnp.moveaxis(out, out_axis, 0)

    return apply_fn, params
