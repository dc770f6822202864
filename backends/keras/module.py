"""A ``tf.Module`` or a restored SavedModel as an :class:`~cvcore.backends.keras.jacobian.Engine`:
``tf.GradientTape`` with respect to its own trainable variables, in their dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cvcore.errors import InputError, ModelError
from cvcore.imports import require
from cvcore.protocols import KernelRequest

from .jacobian import Engine, tape_jacobian, tf_glue, tf_strategy
from .setup import (
    check_real,
    check_weights,
    input_error,
    keras_device,
    map_inputs,
    select_output,
)


def trainable_variables(obj: Any) -> list[tuple[str, Any]]:
    """Trainable ``tf.Variable`` s of a tf.Module or restored SavedModel, with paths,
    each once, in tracking order."""
    tf = require("tensorflow")
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
    tf = require("tensorflow")
    found = trainable_variables(model)
    if not found:
        raise ModelError(
            f"expected a {type(model).__name__} with trainable variables, got none "
            "(a SavedModel keeps variables only if they were tracked, and their trainable flag)"
        )
    names = [n for n, _ in found]
    variables = [v for _, v in found]
    check_real(names, [v.dtype for v in variables])
    dtypes = sorted({v.dtype.name for v in variables if v.dtype.is_floating})
    if dtypes != [request.dtype]:
        raise ModelError(
            f"expected dtype= matching the module's trainable variables ({', '.join(dtypes)}), "
            f"got {request.dtype}; a tf.Module computes in its variables' dtype"
        )
    check_weights(names, [v.numpy() for v in variables])
    named = keras_device(request.device, "tensorflow")
    device = "/" + named.upper()
    call = module_callable(model)

    def apply(batch: Any) -> Any:
        out = select_output(call(batch), request.output)
        return tf.reshape(out, [tf.shape(out)[0], -1])

    def forward(batch: Any) -> Any:
        try:
            with tf.device(device):
                return apply(batch)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise input_error(batch, exc) from exc

    jacobian = tape_jacobian(lambda members, group, state, batch: apply(batch),
                             lambda members, state: [variables[i] for i in members],
                             tf_strategy(request.train, False), device)

    def to_native(batch: Any) -> Any:
        with tf.device(device):
            return map_inputs(tf.convert_to_tensor, batch)

    glue = tf_glue()
    return Engine(sizes=[int(np.prod(v.shape)) for v in variables], forward=forward,
                  jacobian=jacobian, gram=glue[0], to_native=to_native, device=named,
                  reshape=glue[1], concat=glue[2], norms=glue[3])
