"""Per-sample Jacobians of one or more input sets, the Keras side of
:class:`cvcore.protocols.JacobianBackend` (cross kernels and output axes,
:mod:`cvcore.cross`): Keras on JAX and on torch are routed to those backends' Jacobian
paths (as their kernels are, :mod:`.bridge`); Keras on TensorFlow and ``tf.Module`` s use
the engines of :mod:`.jacobian` and :mod:`.module`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from cvcore.data_io import batch_size, slice_inputs
from cvcore.protocols import KernelRequest

from .jacobian import Engine, keras_engine
from .setup import select_output


def _routed(model: Any, x: Any, request: KernelRequest) -> tuple[Any, Any, Any]:
    """Where a model's Jacobians are computed: ``(backend, model, request)`` of the JAX
    or torch backend for Keras on those, else ``(None, engine, raw_call)``."""
    from .setup import is_keras_layer, keras_backend_name, keras_call_inputs

    if is_keras_layer(model):
        backend = keras_backend_name()
        if backend == "jax":
            from cvcore.backends.jax.backend import JaxBackend

            from .bridge import jax_pair

            return JaxBackend(), jax_pair(model, x, request), request
        if backend == "torch":
            from cvcore.backends.torch.backend import TorchBackend

            from .bridge import torch_module, torch_request

            return TorchBackend(), torch_module(model, x, request), torch_request(request)
        engine = keras_engine(model, x, request, backend)

        def raw(batch: Any) -> Any:
            return model(keras_call_inputs(batch), training=request.train)

        return None, engine, raw
    from .module import module_callable, module_engine

    return None, module_engine(model, request), module_callable(model)


def _shape(engine: Engine, raw: Any, native: Any, request: KernelRequest) -> tuple[int, ...]:
    from .setup import to_numpy

    first = native if request.train else slice_inputs(native, 0, 1)
    return tuple(int(d) for d in to_numpy(select_output(raw(first), request.output)).shape[1:])


def output_shape(model: Any, inputs: Any, request: KernelRequest) -> tuple[int, ...]:
    """What ``KerasBackend.output_shape`` returns: one sample's output shape ``S``."""
    from .setup import as_inputs

    x = as_inputs(inputs, request.dtype)
    backend, target, how = _routed(model, x, request)
    if backend is not None:
        return tuple(backend.output_shape(target, x, how))
    return _shape(target, how, target.to_native(x), request)


def jacobian_groups(model: Any, input_sets: tuple[Any, ...], request: KernelRequest
                    ) -> Iterator[tuple[Any, ...]]:
    """What ``KerasBackend.jacobians`` yields: per parameter group, the per-sample
    Jacobians ``(N_s, *S, P_group)`` of every input set as NumPy. Keras on JAX and on
    torch go to those backends' generic Jacobian paths (as their kernels do); Keras on
    TensorFlow and ``tf.Module`` s use this module's engines."""
    from cvcore.blocking import plan_blocks
    from cvcore.errors import InputError

    from .setup import as_inputs, to_numpy

    if len(input_sets) > 1 and request.train:
        raise InputError("expected train=False for a kernel between two input sets (batch "
                         "statistics of one batch do not apply to another), got train=True")
    xs = [as_inputs(x, request.dtype) for x in input_sets]
    backend, engine, raw = _routed(model, xs[0], request)
    if backend is not None:
        yield from backend.jacobians(engine, tuple(xs), raw)
        return
    natives = [engine.to_native(x) for x in xs]
    shapes = [_shape(engine, raw, native, request) for native in natives]
    if any(shape != shapes[0] for shape in shapes):
        raise InputError(f"expected input sets whose outputs have one per-sample shape, got "
                         f"{[list(sh) for sh in shapes]}")
    sizes = [batch_size(x) for x in xs]
    n_outputs = int(np.prod(shapes[0], dtype=np.int64))
    plan = plan_blocks(n_samples=sum(sizes), n_outputs=n_outputs, group_sizes=engine.sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    for group in plan.groups:
        out = []
        for native, n in zip(natives, sizes):
            chunks = [(0, n)] if request.train else plan.chunks(group, 0, n)
            parts = [to_numpy(engine.jacobian(group.members, slice_inputs(native, a, b)))
                     for a, b in chunks]
            j = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out.append(j.reshape(n, *shapes[0], -1))
        yield tuple(out)
