"""The JAX NTK as a matrix-free ``K @ V`` operator (``JaxBackend.operator``).

``K V = J (Jᵀ V)`` with ``jax.vjp`` (``Jᵀ``, accumulated over sample chunks) and
``jax.jvp`` (``J``), both ``vmap``-ed over and jitted once per operator (JAX caches them by shape). ``J`` is never formed.

Conventions (``docs/concepts.md``), as in the torch backend's operator:

* full: ``v ∈ R^{N·O}`` is the cotangent reshaped ``(N, O)``;
* traced: ``K v = (1/O) Σ_o J_o (J_oᵀ v)``, one cotangent per output ``o`` (``v`` in
  column ``o``, zeros elsewhere). A single cotangent ``v ⊗ 1_O`` would add the cross
  terms ``J_o J_o'ᵀ`` and is wrong. A traced product costs ``O`` full ones per vector.

The operator's vectors go through in groups (``g`` "expanded" vectors: columns for full,
column × output pairs for traced) whose parameter-sized ``u = Jᵀ v`` (``g·P`` numbers)
takes at most a quarter of the memory budget; samples go in chunks, padded to one size
(the padding's cotangents are zero and its products dropped), so that ``g`` vectors'
activations fit half of it. Activations per sample are estimated from the sizes of the
intermediates in the traced one-sample forward pass.

Every call runs in the request's dtype (inside ``jax.enable_x64`` for float64, restored
afterwards), on its device, under ``jax.default_matmul_precision("highest")``, including
each later ``matvec``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.blocking import OperatorBudget
from cvcore.data_io import slice_inputs
from cvcore.imports import require
from cvcore.protocols import JacobianProbes, KernelOperator, KernelRequest
from cvcore.validate import require_eval

from . import forms, setup
from .setup import Setup


def _activation_bytes(single: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Bytes of every intermediate of one sample's forward pass (nested jaxprs included):
    an upper bound on what reverse mode saves and forward mode carries per vector."""
    jax = require("jax")

    def walk(jaxpr: Any) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                aval = getattr(var, "aval", None)
                if aval is not None and hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    total += int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += walk(inner)
        return total

    try:
        closed = jax.make_jaxpr(single)(*args)
    except Exception:  # noqa: BLE001 - an estimate only; the products will raise properly
        return 1 << 16
    return max(1, walk(closed.jaxpr))


@dataclasses.dataclass
class _JaxKernelOperator(OperatorBudget):
    """``matvec`` state: the prepared model, padded inputs, jitted products, limits."""

    setup: Setup
    n: int
    n_outputs: int
    request: KernelRequest
    device: Any
    traced: bool
    budget: int
    param_bytes: int
    act_bytes: int
    vjp_fn: Any = None
    jvp_fn: Any = None
    theta: tuple[Any, ...] = ()
    _single: Any = None

    def build(self) -> None:
        """Define the jitted per-chunk products (traced and compiled on first use)."""
        jax = require("jax")
        import jax.numpy as jnp

        prep, leaves, output = self.setup.prep, self.setup.leaves, self.request.output
        index = leaves.trainable
        o = self.n_outputs
        traced = self.traced

        def params_of(theta: Any, values: Any) -> Any:
            return forms.with_values(leaves, index, theta, values)

        def single(theta: Any, values: Any, consts: Any, xi: Any) -> Any:
            xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
            raw = prep.call(params_of(theta, values), consts, xb)
            return forms.select_output(raw, output).reshape(-1)

        def forward(values: Any, consts: Any, xs: Any) -> Callable[[Any], Any]:
            return lambda theta: jax.vmap(single, in_axes=(None, None, None, 0))(
                theta, values, consts, xs)  # (s, O)

        def cotangents(src: Any, outs: Any) -> Any:
            # src (s, W, g) with W = O (full) or 1 (traced) -> (g, s, O)
            if not traced:
                return jnp.moveaxis(src, 2, 0)
            return src[:, 0, :].T[:, :, None] * jax.nn.one_hot(outs, o, dtype=src.dtype)[:, None, :]

        def vjp_chunk(theta: Any, values: Any, consts: Any, xs: Any, src: Any, outs: Any) -> Any:
            _, pullback = jax.vjp(forward(values, consts, xs), theta)
            return jax.vmap(lambda c: pullback(c)[0])(cotangents(src, outs))

        def jvp_chunk(theta: Any, values: Any, consts: Any, xs: Any, u: Any, outs: Any) -> Any:
            f = forward(values, consts, xs)
            y = jax.vmap(lambda t: jax.jvp(f, (theta,), (t,))[1])(u)  # (g, s, O)
            if not traced:
                return jnp.moveaxis(y, 0, 2)  # (s, O, g)
            picked = jnp.take_along_axis(y, outs[:, None, None], axis=2)[:, :, 0]  # (g, s)
            return picked.T[:, None, :] / o  # (s, 1, g)

        self.theta = tuple(leaves.values[i] for i in index)
        self.vjp_fn = jax.jit(vjp_chunk)
        self.jvp_fn = jax.jit(jvp_chunk)
        self._single = single

    def _matvec(self, block: NDArray[np.float64]) -> NDArray[np.float64]:
        with setup.scope(self.request, self.device):
            return self._product(block)

    def _product(self, block: NDArray[np.float64]) -> NDArray[np.float64]:
        import jax.numpy as jnp

        jax = require("jax")
        o, n, k = self.n_outputs, self.n, block.shape[1]
        width = 1 if self.traced else o
        total = k * (o if self.traced else 1)
        g = self.group_size(total)
        s = self.chunk_size(g)
        starts = list(range(0, n, s))
        n_pad = len(starts) * s
        xs_pad = setup.pad_batch(self.setup.x, n_pad)
        chunks_x = [slice_inputs(xs_pad, a, a + s) for a in starts]
        dtype = np.dtype(self.request.dtype)
        v = np.zeros((n_pad, width, k), dtype=dtype)
        v[:n] = block.reshape(n, width, k)
        out = np.zeros((n, width, k), dtype=np.float64)
        prep, values = self.setup.prep, self.setup.leaves.values
        for e0 in range(0, total, g):
            real = min(g, total - e0)
            expanded = np.arange(e0, e0 + g)
            cols = np.where(expanded < total, expanded // (o if self.traced else 1), 0)
            outs = jnp.asarray((expanded % o).astype(np.int32) if self.traced
                               else np.zeros(g, np.int32))
            src = v[:, :, cols]  # (n_pad, W, g): this group's columns
            src[:, :, real:] = 0.0
            src_dev = jax.device_put(src, self.device)
            u = None
            for c, a in enumerate(starts):
                part = self.vjp_fn(self.theta, values, prep.constants, chunks_x[c],
                                   src_dev[a:a + s], outs)
                u = part if u is None else jax.tree_util.tree_map(jnp.add, u, part)
            for c, a in enumerate(starts):
                y = np.asarray(self.jvp_fn(self.theta, values, prep.constants, chunks_x[c],
                                           u, outs), dtype=np.float64)  # (s, W, g)
                b = min(a + s, n)
                np.add.at(out, (slice(a, b), slice(None), cols[:real]),  # type: ignore[arg-type]
                          y[:b - a, :, :real])
        return out.reshape(n * width, k)


def kernel_operator(model: Any, inputs: Any, request: KernelRequest) -> KernelOperator:
    """What ``JaxBackend.operator`` returns: the NTK as a :class:`cvcore.protocols.KernelOperator`.

    Args:
        model: a model in one of the JAX backend's forms.
        inputs: the probe inputs, batch first.
        request: the :class:`cvcore.protocols.KernelRequest`; ``dtype`` is the precision
            of the products (vectors are float64 in and out), ``memory_budget`` bounds the
            vectors' parameter-sized products and the activations per sample chunk.

    Raises:
        InputError: empty inputs, or ``train=True`` (the operator measures eval mode).
    """

    require_eval(request)
    device = setup.resolve_device(request.device)
    with setup.scope(request, device):
        s = setup.prepare(model, inputs, request, device, False)
        itemsize = np.dtype(request.dtype).itemsize
        op = _JaxKernelOperator(setup=s, n=s.n, n_outputs=s.n_outputs, request=request,
                                device=device,
                                traced=request.kernel == "traced",
                                budget=int(request.memory_budget),
                                param_bytes=sum(s.sizes) * itemsize, act_bytes=1)
        op.build()
        x0 = slice_inputs(s.x, 0, 1)
        x0 = require("jax").tree_util.tree_map(lambda a: a[0], x0)
        op.act_bytes = _activation_bytes(op._single, (op.theta, s.leaves.values,
                                                      s.prep.constants, x0))
    return KernelOperator(matvec=op.matvec, dim=op.dim, n_samples=s.n, n_outputs=s.n_outputs,
                          n_params=sum(s.sizes))


def jacobian_probes(model: Any, inputs: Any, request: KernelRequest, sample_axes: int = 1
                    ) -> JacobianProbes:
    """What ``JaxBackend.probes`` returns: the output Jacobian as
    :class:`cvcore.protocols.JacobianProbes`, through ``jax.vjp`` over all the inputs at once
    (one forward pass; each cotangent one pullback). ``sample_axes=2``: each sample's output
    is ``(S, O)`` and its ``S`` rows are samples too.

    Raises:
        InputError: empty inputs, ``train=True``, ``sample_axes`` not 1 or 2.
    """
    from cvcore.errors import InputError

    jax = require("jax")
    import jax.numpy as jnp

    require_eval(request)
    if sample_axes not in (1, 2):
        raise InputError(f"expected sample_axes 1 or 2, got {sample_axes!r}")
    device = setup.resolve_device(request.device)
    with setup.scope(request, device):
        s = setup.prepare(model, inputs, request, device, False)
        prep, leaves, output = s.prep, s.leaves, request.output
        index = leaves.trainable

        def single(theta: Any, xi: Any) -> Any:
            xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
            raw = prep.call(forms.with_values(leaves, index, theta, leaves.values),
                            prep.constants, xb)
            out = forms.select_output(raw, output)
            return out.reshape(-1) if sample_axes == 1 else out.reshape(-1, out.shape[-1])

        def f(theta: Any) -> Any:
            y = jax.vmap(single, in_axes=(None, 0))(theta, s.x)
            return y.reshape(-1, y.shape[-1])  # (rows, O)

        theta = tuple(leaves.values[i] for i in index)
        out, pullback = jax.vjp(f, theta)
        n_rows, n_out = int(out.shape[0]), int(out.shape[1])

        def flat_products(z: Any) -> Any:
            flat = [t.reshape(-1) for t in jax.tree_util.tree_leaves(pullback(z)[0])]
            return jnp.concatenate(flat)

        products: Any = jax.jit(flat_products)

    def gram(a: NDArray[np.float64], sv: NDArray[np.float64]) -> NDArray[np.float64]:
        with setup.scope(request, device):
            dtype = out.dtype
            us = [products(jnp.asarray(a[j] @ sv[j].T, dtype=dtype)) for j in range(a.shape[0])]
            u = np.asarray(jnp.stack(us), dtype=np.float64)
        g: NDArray[np.float64] = u @ u.T
        return g

    def outputs() -> NDArray[Any]:
        arr: NDArray[Any] = np.asarray(out)
        return arr

    return JacobianProbes(vjp_gram=gram, outputs=outputs, n_samples=n_rows, n_outputs=n_out,
                          n_params=sum(s.sizes))
