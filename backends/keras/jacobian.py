"""Per-sample Jacobians of a Keras model with the running Keras backend's autodiff, and
the kernel summed from them block by block.

* TensorFlow: ``tf.GradientTape.jacobian`` (pfor over the outputs) per sample, see
  :data:`TF_VECTORIZE` and :func:`tape_jacobian`; traced functions are kept for later
  calls on the same model (:data:`TF_FUNCTIONS`);
* torch: ``torch.func.vmap(jacrev(f))`` on ``model.stateless_call``.

Keras on JAX does not come here: :mod:`cvcore.backends.keras.bridge` hands it to the
JAX backend. :func:`cvcore.backends.keras.setup.prepare` (the model as a function of its
weights, a :class:`cvcore.backends.keras.setup.Setup`) serves both.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from cvcore.blocking import BlockPlan
from cvcore.data_io import batch_size, slice_inputs
from cvcore.imports import require
from cvcore.outputs import check_finite
from cvcore.protocols import KernelRequest

from .setup import (
    Setup,
    input_error,
    prepare,
    select_output,
)


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
        reshape: ``reshape(t, shape)`` of a native tensor.
        concat: concatenation of native tensors along the first axis.
        norms: ``norms(j) -> Σ_p j[..., p]²`` as NumPy, for a ``(b, O, P_group)`` tensor.
    """

    sizes: list[int]
    forward: Callable[[Any], Any]
    jacobian: Callable[[tuple[int, ...], Any], Any]
    gram: Callable[[Any, Any], np.ndarray[Any, Any]]
    to_native: Callable[[Any], Any]
    device: str
    reshape: Callable[[Any, tuple[int, ...]], Any]
    concat: Callable[[list[Any]], Any]
    norms: Callable[[Any], np.ndarray[Any, Any]]


def assemble(engine: Engine, x: Any, request: KernelRequest, plan: BlockPlan,
             n_outputs: int) -> np.ndarray[Any, Any]:
    """Sum ``J_g J_gᵀ`` over parameter groups and pairs of sample blocks (NumPy kernel,
    products on the framework's device)."""
    n = batch_size(x)
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
    check_finite(np.diagonal(kernel), n, width)
    return kernel


def _group(plan: BlockPlan, members: tuple[int, ...]) -> Any:
    return next(g for g in plan.groups if g.members == members)


def keras_engine(model: Any, x: Any, request: KernelRequest, backend: str) -> Engine:
    """An engine for a Keras 3 model on the TensorFlow or torch Keras backend."""
    keras = require("keras", "tensorflow")
    ops = keras.ops
    s = prepare(model, x, request, backend)
    device, theta = s.device, s.theta

    def apply(params: list[Any], batch: Any, constants: list[Any] | None = None) -> Any:
        out = select_output(s.call(params, batch, constants), request.output)
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

    if backend == "tensorflow":
        jacobian = _tf_jacobian(s, apply, request, model)
    else:
        jacobian = _torch_jacobian(apply, theta, request.train)

    def in_device(members: tuple[int, ...], batch: Any) -> Any:
        with keras.device(device):
            return jacobian(members, batch)

    glue = _GLUE[backend]()
    return Engine(sizes=[int(np.prod(v.shape)) for v in theta], forward=forward,
                  jacobian=in_device, gram=glue[0], to_native=s.to_native, device=device,
                  reshape=glue[1], concat=glue[2], norms=glue[3])


def tf_glue() -> tuple[Any, Any, Any, Any]:
    """``gram``, ``reshape``, ``concat`` and ``norms`` of an :class:`Engine` on TensorFlow."""
    tf = require("tensorflow")
    return (lambda a, b: tf.matmul(a, b, transpose_b=True).numpy(),
            lambda t, s: tf.reshape(t, s), lambda ts: tf.concat(ts, axis=0),
            lambda j: tf.reduce_sum(j * j, axis=-1).numpy())


def _torch_glue() -> tuple[Any, Any, Any, Any]:
    import torch

    return (lambda a, b: (a @ b.T).detach().cpu().numpy(), lambda t, s: t.reshape(s),
            lambda ts: torch.cat(ts, dim=0), lambda j: (j * j).sum(-1).detach().cpu().numpy())


_GLUE = {"tensorflow": tf_glue, "torch": _torch_glue}

#: How GradientTape Jacobians are computed in eval mode (train mode always uses
#: ``"batched"``, since batch statistics couple the samples):
#:
#: * ``"vectorized"``: ``tape.jacobian`` of one sample (pfor over the O outputs) inside
#:   ``tf.vectorized_map`` over the samples, one ``tf.function``. Fastest for dense
#:   models; on convolutions pfor has no vectorised rule for the filter gradient of
#:   per-sample inputs and falls back to a ``while_loop`` whose tracing dominates (41.6 s
#:   of 44 s for MobileNetV2 on 4 samples, see docs/backend-tensorflow.md).
#: * ``"loop"``: the same one-sample ``tape.jacobian`` in a ``tf.function`` traced once
#:   (batch size one), called for each sample from Python. The filter gradient keeps its
#:   vectorised form (the O output-gradients merged into channels); 10.6 s of tracing
#:   and 0.3 s per sample on MobileNetV2.
#: * ``"batched"``: one ``tape.jacobian`` of the (b, O) batch output (pfor over b·O rows,
#:   each a backward pass through the whole block: O(b²) work).
#: * ``"auto"`` (default): ``"loop"`` for a Keras model with a convolution layer,
#:   ``"vectorized"`` otherwise.
TF_VECTORIZE = "auto"


def has_convolution(model: Any) -> bool:
    """Whether a Keras model holds a convolution layer (``Conv*``, ``DepthwiseConv*``,
    ``SeparableConv*``, transposed ones)."""
    from .setup import layers_of

    return any("Conv" in type(layer).__name__ for layer in layers_of(model))


def tf_strategy(train: bool, convolutions: bool) -> str:
    """``"vectorized"``, ``"loop"`` or ``"batched"`` as :data:`TF_VECTORIZE` says."""
    if train:
        return "batched"
    if TF_VECTORIZE != "auto":
        return TF_VECTORIZE
    return "loop" if convolutions else "vectorized"


def _merge(theta: list[Any], members: tuple[int, ...], group: list[Any]) -> list[Any]:
    full = list(theta)
    for k, i in enumerate(members):
        full[i] = group[k]
    return full


def tape_jacobian(call: Callable[[tuple[int, ...], list[Any], Any, Any], Any],
                  group_of: Callable[[tuple[int, ...], Any], list[Any]], strategy: str,
                  device: str | None = None, state: Any = (),
                  cache: dict[tuple[int, ...], Any] | None = None
                  ) -> Callable[[tuple[int, ...], Any], Any]:
    """GradientTape Jacobians ``(b, O, P_group)`` of ``call(members, group, state, batch)
    -> (b, O)`` w.r.t. ``group = group_of(members, state)``, one ``tf.function`` per
    parameter group, computed as ``strategy`` (see :data:`TF_VECTORIZE`) says.

    ``state`` (tensors) is an argument of the ``tf.function`` s, not a constant in them,
    so functions kept in ``cache`` serve later calls with other values of it."""
    tf = require("tensorflow")
    cache = {} if cache is None else cache

    def flat(js: list[Any], lead: int) -> Any:
        return tf.concat([tf.reshape(j, tf.concat([tf.shape(j)[:lead], [-1]], 0)) for j in js],
                         axis=lead)

    def build(members: tuple[int, ...]) -> Any:
        def jac(st: Any, batch: Any, lead: int, squeeze: bool) -> Any:
            group = group_of(members, st)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(group)
                out = call(members, group, st, batch)
                if squeeze:
                    out = out[0]
            return flat(tape.jacobian(out, group, experimental_use_pfor=True,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO), lead)

        if strategy == "batched":
            return tf.function(lambda st, batch: jac(st, batch, 2, False), reduce_retracing=True)
        if strategy == "loop":
            one = tf.function(lambda st, xi: jac(st, xi, 2, False))

            def loop(st: Any, batch: Any) -> Any:
                n = int(tf.nest.flatten(batch)[0].shape[0])
                rows = [one(st, tf.nest.map_structure(lambda t, i=i: t[i:i + 1], batch))
                        for i in range(n)]
                return rows[0] if n == 1 else tf.concat(rows, axis=0)

            return loop

        def vectorized(st: Any, batch: Any) -> Any:
            return tf.vectorized_map(
                lambda xi: jac(st, tf.nest.map_structure(lambda t: t[None], xi), 1, True), batch)

        return tf.function(vectorized, reduce_retracing=True)

    def jacobian(members: tuple[int, ...], batch: Any) -> Any:
        if members not in cache:
            cache[members] = build(members)
        if device is None:
            return cache[members](state, batch)
        with tf.device(device):
            return cache[members](state, batch)

    return jacobian


#: Traced Jacobian functions kept for later calls on the same Keras model (TensorFlow
#: backend), most recent last: ``key -> (model, output selector, {members: function})``.
#: The entries hold the model and the selector, so their ids in the key stay theirs.
TF_FUNCTIONS: collections.OrderedDict[Any, Any] = collections.OrderedDict()
TF_FUNCTIONS_SIZE = 4


def _functions_for(s: Setup, request: KernelRequest, strategy: str
                   ) -> dict[tuple[int, ...], Any] | None:
    """The cache of traced functions for this model and request; ``None`` (no reuse) for a
    recast copy, which is new in every call.

    The key holds everything a traced function depends on besides the weights' values:
    the model object, its variables' paths, shapes and dtypes (a layer frozen since
    changes them), the strategy, train mode, output selector and device."""
    if s.recast:
        return None
    output = request.output
    selector = output if output is None or isinstance(output, (int, str)) else ("id", id(output))
    key = (id(s.runner), tuple(s.paths),
           tuple((tuple(t.shape), t.dtype.name) for t in [*s.theta, *s.fixed]),
           strategy, request.train, selector, s.device)
    if key not in TF_FUNCTIONS:
        TF_FUNCTIONS[key] = (s.runner, output, {})
        while len(TF_FUNCTIONS) > TF_FUNCTIONS_SIZE:
            TF_FUNCTIONS.popitem(last=False)
    TF_FUNCTIONS.move_to_end(key)
    return TF_FUNCTIONS[key][2]


def _tf_jacobian(s: Setup, apply: Callable[..., Any], request: KernelRequest,
                 model: Any) -> Callable[[tuple[int, ...], Any], Any]:
    """GradientTape Jacobians of a Keras model's stateless call (TensorFlow backend), the
    weights passed to the traced functions as arguments so that later calls on the same
    model reuse them (see :data:`TF_FUNCTIONS`)."""
    strategy = tf_strategy(request.train, has_convolution(model))
    return tape_jacobian(
        lambda members, group, st, batch: apply(_merge(st[0], members, group), batch, st[1]),
        lambda members, st: [st[0][i] for i in members], strategy,
        state=(s.theta, s.fixed), cache=_functions_for(s, request, strategy))


def _torch_jacobian(apply: Callable[..., Any], theta: list[Any],
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

        def flat(js: Any) -> Any:
            return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in js], dim=2).detach()

        if train:
            return flat(jacrev(batched)(group))
        try:
            return flat(vmap(jacrev(single), in_dims=(None, 0))(group, batch))
        except RuntimeError as exc:
            if "vmap" not in str(exc):
                raise
        # Keras' torch convolutions clone in channels-last layout, which vmap does not
        # support: one sample at a time, each a Jacobian of a batch of one.
        n = int(torch.utils._pytree.tree_leaves(batch)[0].shape[0])
        return torch.cat([flat(jacrev(lambda g, i=i: apply(_merge(theta, members, g),
                                                          slice_inputs(batch, i, i + 1)))(group))
                          for i in range(n)])

    return jacobian
