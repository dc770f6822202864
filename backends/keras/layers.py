"""The kernel split by layer (``per_layer=True``) for Keras models and ``tf.Module`` s.

A layer is a variable's path without its last component, its parts joined by ``.`` as
PyTorch names its modules: Keras' ``dense_1/kernel`` is layer ``dense_1`` (the layer's
name, nested layers joined by ``.``: ``block.fc`` for ``net/block/fc/kernel``, the model's
own name left off); a ``tf.Module``'s variable names are split the same way
(``dense/kernel:0`` → ``dense``), ``(root)`` for a variable with no layer. Each layer's
kernel is the Jacobian path over that layer's variables only (the engine's per-group
Jacobian with the group restricted to the layer), so the work is the whole kernel's,
split into one Jacobian per layer. A Keras model on the JAX backend goes, like its whole
kernel, to the JAX backend (``(apply_fn, theta)`` with ``theta`` grouped by layer name).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cvcore.blocking import plan_blocks
from cvcore.data_io import batch_size, require_samples, slice_inputs
from cvcore.errors import ModelError
from cvcore.imports import require
from cvcore.protocols import KernelRequest, LayerKernel, LayerKernels, layer_of

from .jacobian import Engine, assemble, keras_engine
from .setup import (
    as_inputs,
    is_keras_layer,
    is_tf_trackable,
    keras_backend_name,
    keras_float64,
)


def _layer_engine(engine: Engine, members: list[int]) -> Engine:
    """The engine seen through a layer: groups index that layer's variables."""
    return dataclasses.replace(
        engine, sizes=[engine.sizes[i] for i in members],
        jacobian=lambda group, batch: engine.jacobian(tuple(members[j] for j in group), batch))


def _module_paths(model: Any) -> dict[int, str]:
    """A ``tf.Module``'s variables by id: their attribute paths (``l1/w`` for
    ``self.l1.w``), ``/``-joined; empty for a restored SavedModel (its names are paths)."""
    tf = require("tensorflow")
    if not isinstance(model, tf.Module):
        return {}
    flat = model._flatten(predicate=lambda v: isinstance(v, tf.Variable), with_path=True)
    return {id(v): "/".join(str(key) for key in path) for path, v in flat}


def _variable_names(model: Any, kind: str) -> list[str]:
    """Every trainable variable's path, ``/``-joined, the model's own name left off: a
    Keras variable's ``path``; a ``tf.Module``'s attribute path (its variables' own
    names, ``w:0``, say nothing of where they sit)."""
    if kind == "tf.Module":
        from .module import trainable_variables

        by_id = _module_paths(model)
        return [by_id.get(id(v), name.split(":")[0].replace(".", "/"))
                for name, v in trainable_variables(model)]
    paths = [str(v.path) for v in model.trainable_variables]
    prefix = f"{model.name}/"
    if all(p.startswith(prefix) for p in paths):  # Sequential / functional: the model's own name
        paths = [p[len(prefix):] for p in paths]
    return paths


def layer_kernels(model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
    """What ``KerasBackend.layer_kernels`` returns (see the module doc)."""
    import contextlib

    x = as_inputs(inputs, request.dtype)
    n = batch_size(x)
    require_samples(n)
    if is_keras_layer(model):
        kind = keras_backend_name()
        scope: Any = keras_float64(kind, request.dtype == "float64")
    elif is_tf_trackable(model):
        kind, scope = "tf.Module", contextlib.nullcontext()
    else:
        raise ModelError("expected a Keras 3 layer / model, a tf.Module or a loaded "
                         f"SavedModel, got {type(model).__qualname__}")
    with scope:
        if kind == "jax":
            return _on_jax(model, x, request)
        if kind == "tf.Module":
            from .module import module_engine

            engine = module_engine(model, request)
        else:
            engine = keras_engine(model, x, request, kind)
        native = engine.to_native(x)
        n_outputs = int(np.prod(engine.forward(slice_inputs(native, 0, 1)).shape[1:]))
        groups = _groups(_variable_names(model, kind))
        layers = []
        for layer, members in groups.items():
            sub = _layer_engine(engine, members)
            plan = plan_blocks(n_samples=n, n_outputs=n_outputs, group_sizes=sub.sizes,
                               itemsize=np.dtype(request.dtype).itemsize,
                               budget=request.memory_budget)
            layers.append(LayerKernel(name=layer, n_params=sum(sub.sizes),
                                      kernel=assemble(sub, native, request, plan, n_outputs)))
    return LayerKernels(layers=tuple(layers), n_samples=n, n_outputs=n_outputs,
                        device=engine.device)


def _groups(names: list[str]) -> dict[str, list[int]]:
    """Variable indices by layer, in model order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(layer_of(name, "/").replace("/", "."), []).append(i)
    return groups


def _on_jax(model: Any, x: Any, request: KernelRequest) -> LayerKernels:
    """Keras on JAX: the JAX backend's per-layer kernels of ``(apply_fn, theta)``, with
    ``theta`` a dict of per-layer lists so that its tree paths are the layer names."""
    from ..jax.backend import JaxBackend
    from .bridge import jax_pair

    apply_fn, theta = jax_pair(model, x, request)
    groups = _groups(_variable_names(model, "jax"))
    order = [i for members in groups.values() for i in members]

    def by_layer(params: dict[str, list[Any]], *args: Any, **kwargs: Any) -> Any:
        flat = [leaf for layer in groups for leaf in params[layer]]
        ordered = [None] * len(flat)
        for position, index in enumerate(order):
            ordered[index] = flat[position]
        return apply_fn(ordered, *args, **kwargs)

    params = {layer: [theta[i] for i in members] for layer, members in groups.items()}
    split = JaxBackend().layer_kernels((by_layer, params), x, request)
    rows = {layer.name: layer for layer in split.layers}  # JAX lists dict keys sorted
    return dataclasses.replace(split, layers=tuple(rows[k] for k in groups if k in rows))
