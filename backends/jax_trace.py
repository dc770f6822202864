"""The JAX NTK without forming it: its diagonal ``K_ii``, and ``K @ V`` matrix-free.

* :func:`kernel_diagonal` (``JaxBackend.diagonal``): ``K_(i,o),(i,o) = ‖J_io‖²`` from the
  same jitted, vmapped per-sample Jacobians as the kernel
  (:func:`cvcore.backends.jax_backend.make_jacobian`), squared and summed on the device
  one chunk of samples at a time (chunks and parameter groups from
  :func:`cvcore.blocking.plan_blocks`, as for the kernel). Nothing of size ``N²`` is
  formed. Traced: ``(1/O) Σ_o ‖J_io‖²`` (``N`` values); full: ``‖J_io‖²`` (``N·O``
  values, row ``i·O + o``).
* :func:`kernel_operator` (``JaxBackend.operator``): ``K V = J (Jᵀ V)`` with ``jax.vjp``
  (``Jᵀ``, accumulated over sample chunks) and ``jax.jvp`` (``J``), both ``vmap``-ed over
  the vectors and jitted once per operator (JAX caches them by shape). ``J`` is never
  formed.

Conventions (``docs/concepts.md``), as in :mod:`cvcore.backends.torch_operator`:

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

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from cvcore.backends import jax_backend as jb
from numpy.typing import NDArray

from cvcore.blocking import OperatorBudget, plan_blocks
from cvcore.errors import InputError, ModelError
from cvcore.protocols import Implementation, KernelRequest


@contextlib.contextmanager
def _scope(request: KernelRequest, device: Any) -> Iterator[None]:
    """The same dtype / device / precision context as ``JaxBackend.ntk``."""
    jax = jb._jax()
    with jb.x64_scope(request.dtype == "float64"), jax.default_device(device), \
            jax.default_matmul_precision("highest"):
        yield


@dataclasses.dataclass
class _Setup:
    prep: jb.Prepared
    leaves: jb.Leaves
    x: Any
    n: int
    n_outputs: int
    sizes: list[int]


def _setup(model: Any, inputs: Any, request: KernelRequest, device: Any, train: bool) -> _Setup:
    """Prepare the model and inputs exactly as ``JaxBackend._ntk`` does (call in scope)."""
    import jax.numpy as jnp

    dtype = jnp.float64 if request.dtype == "float64" else jnp.float32
    prep = jb.prepare(model, train)
    prep.params = jb.cast_tree(prep.params, dtype, device)
    prep.constants = jb.cast_tree(prep.constants, dtype, device)
    leaves = jb.flatten_params(prep.params)
    x = jb.to_arrays(inputs, dtype, device)
    n = jb.batch_of(x)
    if n == 0:
        raise InputError("expected at least one input sample, got an empty batch")
    n_outputs = jb.probe_outputs(prep, leaves, x, request.output)
    sizes = [int(leaves.values[i].size) for i in leaves.trainable]
    return _Setup(prep, leaves, x, n, n_outputs, sizes)


def _check_finite(diag: NDArray[Any], n: int) -> None:
    """Raise naming the samples whose outputs or gradients are NaN or Inf."""
    bad = np.flatnonzero(~np.isfinite(diag).all(axis=1))
    if bad.size:
        shown = ", ".join(map(str, bad[:10].tolist())) + (" ..." if bad.size > 10 else "")
        raise ModelError(
            f"expected finite outputs and gradients, got NaN/Inf for {bad.size} of {n} "
            f"samples (indices {shown})"
        )


# --------------------------------------------------------------------------- diagonal


def kernel_diagonal(model: Any, inputs: Any, request: KernelRequest) -> NDArray[np.floating[Any]]:
    """What ``JaxBackend.diagonal`` returns: ``K_ii`` as NumPy in the request's dtype.

    Traced: ``(1/O) Σ_o ‖J_io‖²`` (``N`` values); full: ``‖J_io‖²`` in row order
    ``i·O + o`` (``N·O`` values). ``Tr K`` is their sum.
    """
    device = jb.resolve_device(request.device)
    with _scope(request, device):
        return _diagonal(model, inputs, request, device)


def _diagonal(model: Any, inputs: Any, request: KernelRequest, device: Any) -> NDArray[Any]:
    import jax.numpy as jnp

    s = _setup(model, inputs, request, device, request.train)
    if request.implementation != Implementation.JACOBIAN:
        from cvcore.backends.jax_structured import attempt, structured_diagonal

        ruled = attempt(structured_diagonal, s.prep, s.leaves, s.x, request, s.n_outputs)
        if ruled is not None:
            _check_finite(ruled, s.n)
            return ruled.mean(axis=1) if request.kernel == "traced" else ruled.reshape(-1)
    plan = plan_blocks(n_samples=s.n, n_outputs=s.n_outputs, group_sizes=s.sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    whole_batch = request.train and s.prep.batched  # one Jacobian of the coupled batch
    diag = np.zeros((s.n, s.n_outputs), dtype=np.dtype(request.dtype))
    for group in plan.groups:
        jac = jb.make_jacobian(s.prep, s.leaves, group, request, s.n_outputs)
        chunks = [(0, s.n)] if whole_batch else plan.chunks(group, 0, s.n)
        size = max(b - a for a, b in chunks)
        for a, b in chunks:
            j = jac(s.x, a, b, size)  # (b - a, O, P_group), on the device
            diag[a:b] += np.asarray(jnp.sum(j * j, axis=2))
    _check_finite(diag, s.n)
    return diag.mean(axis=1) if request.kernel == "traced" else diag.reshape(-1)


# --------------------------------------------------------------------------- operator


def _activation_bytes(single: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Bytes of every intermediate of one sample's forward pass (nested jaxprs included):
    an upper bound on what reverse mode saves and forward mode carries per vector."""
    jax = jb._jax()

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

    setup: _Setup
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

    @property
    def n(self) -> int:
        return self.setup.n

    @property
    def n_outputs(self) -> int:
        return self.setup.n_outputs

    def build(self) -> None:
        """Define the jitted per-chunk products (traced and compiled on first use)."""
        jax = jb._jax()
        import jax.numpy as jnp

        prep, leaves, output = self.setup.prep, self.setup.leaves, self.request.output
        index = leaves.trainable
        o = self.n_outputs
        traced = self.traced

        def params_of(theta: Any, values: Any) -> Any:
            return jb.with_values(leaves, index, theta, values)

        def single(theta: Any, values: Any, consts: Any, xi: Any) -> Any:
            xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
            raw = prep.call(params_of(theta, values), consts, xb)
            return jb.select_output(raw, output).reshape(-1)

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
        with _scope(self.request, self.device):
            return self._product(block)

    def _product(self, block: NDArray[np.float64]) -> NDArray[np.float64]:
        import jax.numpy as jnp

        jax = jb._jax()
        o, n, k = self.n_outputs, self.n, block.shape[1]
        width = 1 if self.traced else o
        total = k * (o if self.traced else 1)
        g = self.group_size(total)
        s = self.chunk_size(g)
        starts = list(range(0, n, s))
        n_pad = len(starts) * s
        xs_pad = jb.pad_batch(self.setup.x, n_pad)
        chunks_x = [jb.slice_inputs(xs_pad, a, a + s) for a in starts]
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


def kernel_operator(model: Any, inputs: Any, request: KernelRequest) -> Any:
    """What ``JaxBackend.operator`` returns: the NTK as a :class:`cvcore.estimate.KernelOperator`.

    Args:
        model: a model in one of the JAX backend's forms.
        inputs: the probe inputs, batch first.
        request: the :class:`cvcore.protocols.KernelRequest`; ``dtype`` is the precision
            of the products (vectors are float64 in and out), ``memory_budget`` bounds the
            vectors' parameter-sized products and the activations per sample chunk.

    Raises:
        InputError: empty inputs, or ``train=True`` (the operator measures eval mode).
    """
    from cvcore.estimate import KernelOperator

    if request.train:
        raise InputError("expected train=False for the matrix-free operator (batch statistics "
                         "and dropout change between products), got train=True; use method='exact'")
    device = jb.resolve_device(request.device)
    with _scope(request, device):
        s = _setup(model, inputs, request, device, False)
        itemsize = np.dtype(request.dtype).itemsize
        op = _JaxKernelOperator(setup=s, request=request, device=device,
                                traced=request.kernel == "traced",
                                budget=int(request.memory_budget),
                                param_bytes=sum(s.sizes) * itemsize, act_bytes=1)
        op.build()
        x0 = jb.slice_inputs(s.x, 0, 1)
        x0 = jb._jax().tree_util.tree_map(lambda a: a[0], x0)
        op.act_bytes = _activation_bytes(op._single, (op.theta, s.leaves.values,
                                                      s.prep.constants, x0))
    return KernelOperator(matvec=op.matvec, dim=op.dim, n_samples=s.n, n_outputs=s.n_outputs,
                          n_params=sum(s.sizes))
