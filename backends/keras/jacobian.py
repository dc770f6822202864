"""Per-sample Jacobians of a Keras model with the running Keras backend's autodiff, and
the kernel summed from them block by block.

* TensorFlow: ``tf.GradientTape.jacobian`` (pfor over the outputs) per sample, see
  :func:`tape_jacobian`;
* JAX: ``jax.jit(jax.vmap(jax.jacrev(f)))``; torch: ``torch.func.vmap(jacrev(f))``, both on
  ``model.stateless_call``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from cvcore.backends.keras.recast import check_weights, needs_recast, recast
from cvcore.backends.keras.setup import (
    _keras,
    _tf,
    batch_of,
    input_error,
    keras_device,
    map_inputs,
    select_output,
)

from cvcore.blocking import Plan
from cvcore.data_io import slice_inputs
from cvcore.errors import ModelError
from cvcore.protocols import KernelRequest


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


def keras_call_inputs(x: Any) -> Any:
    """Keras takes several inputs as a list."""
    return list(x) if isinstance(x, tuple) else x


@dataclasses.dataclass
class Stateless:
    """A Keras model as a function of its weights: ``call(theta, batch)`` is the raw output
    of ``stateless_call`` with the trainable weights ``theta`` (non-trainable ones fixed).

    Attributes:
        call: ``call(theta, batch)``, batch as native tensors.
        theta: the trainable weights, cast to the request's dtype, in model order.
        paths: their variable paths, for messages.
        device: the Keras device string the computation runs on.
        to_native: turns a NumPy batch into the Keras backend's tensors.
    """

    call: Callable[[list[Any], Any], Any]
    theta: list[Any]
    paths: list[str]
    device: str
    to_native: Callable[[Any], Any]


def stateless(model: Any, x: Any, request: KernelRequest, backend: str) -> Stateless:
    """``model`` ready for ``stateless_call`` in the request's dtype and on its device (a
    recast copy when the model's own dtype differs; the user's model is untouched)."""
    keras = _keras()
    ops = keras.ops
    dtype = request.dtype
    device = keras_device(request.device, backend)
    trainable = list(model.trainable_variables)
    if not trainable:
        raise ModelError("expected a model with trainable variables, got none "
                         "(all frozen, or the model is not built)")
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

    def call(params: list[Any], batch: Any) -> Any:
        raw, _ = runner.stateless_call(list(params), fixed, keras_call_inputs(batch),
                                       training=request.train)
        return raw

    return Stateless(call=call, theta=theta, paths=paths, device=device, to_native=to_native)


def keras_engine(model: Any, x: Any, request: KernelRequest, backend: str) -> Engine:
    """An engine for a Keras 3 model on the TensorFlow or torch Keras backend."""
    keras = _keras()
    ops = keras.ops
    s = stateless(model, x, request, backend)
    device, theta = s.device, s.theta

    def apply(params: list[Any], batch: Any) -> Any:
        out = select_output(s.call(params, batch), request.output)
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

    make = {"tensorflow": _tf_jacobian, "torch": _torch_jacobian}[backend]
    jacobian = make(apply, theta, request.train, model)

    def in_device(members: tuple[int, ...], batch: Any) -> Any:
        with keras.device(device):
            return jacobian(members, batch)

    glue = _GLUE[backend]()
    return Engine(sizes=[int(np.prod(v.shape)) for v in theta], forward=forward,
                  jacobian=in_device, gram=glue[0], to_native=s.to_native, device=device,
                  reshape=glue[1], concat=glue[2], norms=glue[3])


def tf_glue() -> tuple[Any, Any, Any, Any]:
    """``gram``, ``reshape``, ``concat`` and ``norms`` of an :class:`Engine` on TensorFlow."""
    tf = _tf()
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
    from cvcore.backends.keras.recast import layers_of

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


def tape_jacobian(call: Callable[[tuple[int, ...], list[Any], Any], Any],
                  group_of: Callable[[tuple[int, ...]], list[Any]], strategy: str,
                  device: str | None = None) -> Callable[[tuple[int, ...], Any], Any]:
    """GradientTape Jacobians ``(b, O, P_group)`` of ``call(members, group, batch) -> (b, O)``
    w.r.t. ``group``, one ``tf.function`` per parameter group, computed as ``strategy``
    (see :data:`TF_VECTORIZE`) says."""
    tf = _tf()
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

        if strategy == "batched":
            return tf.function(lambda batch: jac(batch, 2, False), reduce_retracing=True)
        if strategy == "loop":
            one = tf.function(lambda xi: jac(xi, 2, False))

            def loop(batch: Any) -> Any:
                n = int(tf.nest.flatten(batch)[0].shape[0])
                rows = [one(tf.nest.map_structure(lambda t, i=i: t[i:i + 1], batch))
                        for i in range(n)]
                return rows[0] if n == 1 else tf.concat(rows, axis=0)

            return loop
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
                 train: bool, model: Any) -> Callable[[tuple[int, ...], Any], Any]:
    """GradientTape Jacobians of a Keras model's stateless call (TensorFlow backend)."""
    return tape_jacobian(lambda members, group, batch: apply(_merge(theta, members, group), batch),
                         lambda members: [theta[i] for i in members],
                         tf_strategy(train, has_convolution(model)))


def _torch_jacobian(apply: Callable[[list[Any], Any], Any], theta: list[Any],
                    train: bool, model: Any) -> Callable[[tuple[int, ...], Any], Any]:
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


# --------------------------------------------------------------------------- tf.Module

