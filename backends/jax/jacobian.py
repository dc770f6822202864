"""The JAX backend's Jacobian path: jitted, vmapped per-sample Jacobians, one GEMM per block.

Every engine of the backend starts from a :class:`cvcore.backends.jax.setup.Setup`
(:func:`cvcore.backends.jax.setup.prepare`); :func:`make_jacobian` gives the Jacobian block of a chunk of
samples for a parameter group; :func:`assemble` accumulates the kernel over the groups
and sample blocks of a :class:`cvcore.blocking.BlockPlan`. Built on :mod:`forms`, :mod:`setup`
and :mod:`jaxpr` only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cvcore.blocking import BlockPlan, Group
from cvcore.data_io import batch_size, slice_inputs
from cvcore.imports import require
from cvcore.outputs import check_finite
from cvcore.protocols import KernelRequest

from .forms import Leaves, Prepared, select_output, with_values
from .jaxpr import cached, evaluate
from .setup import pad_batch

JacobianFn = Callable[[Any, int, int, int], Any]


#: Jitted Jacobian functions of recent models, keyed by the traced forward pass's text
#: (structure, shapes, dtypes, literals; weights, constants and closed-over arrays are
#: arguments), so that measuring many checkpoints of one architecture compiles once.
_JITTED: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def _jitted(key: tuple[Any, ...], closed: Any, build: Callable[[Any], Any]) -> Any:
    """``build(jaxpr)`` for the traced ``closed`` jaxpr, from the cache when the same
    computation was compiled recently."""
    return cached(_JITTED, (*key, str(closed.jaxpr)), lambda: build(closed.jaxpr))


def _as_function(jaxpr: Any) -> Callable[..., Any]:
    """``f(jaxpr_consts, *args)``: the jaxpr's first output, its inputs given as pytrees
    flattened in the order the jaxpr was traced with."""
    jax = require("jax")

    def f(consts: Any, *args: Any) -> Any:
        return evaluate(jaxpr, consts, jax.tree_util.tree_leaves(args), (), {}, {}, {})[0]

    return f


def make_jacobian(prep: Prepared, leaves: Leaves, group: Group, request: KernelRequest,
                  n_outputs: int) -> JacobianFn:
    """A function ``(x, start, stop, size)`` giving the Jacobian block (stop-start, O,
    P_group) of samples ``[start, stop)`` with respect to the group's leaves.

    Eval mode: per-sample ``jacrev`` (``jacfwd`` when O exceeds the group's size), vmapped
    over samples and jitted; chunks are padded to one size so it compiles once. Train mode
    on a batched model: rows of the Jacobian of the whole batch's call, since batch
    statistics couple the samples (``size`` is ignored). The forward pass is traced once
    per call and the jitted function comes from a cache keyed by its text (``_jitted``).
    """
    jax = require("jax")
    import jax.numpy as jnp

    index = [leaves.trainable[m] for m in group.members]
    output = request.output

    def params_of(group_values: Any, values: Any) -> Any:
        return with_values(leaves, index, group_values, values)

    def stack(jac: Any, b: int) -> Any:
        return jnp.concatenate([j.reshape(b, n_outputs, -1) for j in jac], axis=2)

    group_values = tuple(leaves.values[i] for i in index)

    if request.train and prep.batched:
        def whole_batch(gv: Any, values: Any, consts: Any, x: Any) -> Any:
            raw = prep.call(params_of(gv, values), consts, x)
            return select_output(raw, output).reshape(batch_size(x), -1)

        def build_batch(jaxpr: Any) -> Any:
            f = _as_function(jaxpr)
            return jax.jit(lambda jc, gv, values, consts, x: jax.jacrev(
                lambda g: f(jc, g, values, consts, x))(gv))

        def train_jac(x: Any, start: int, stop: int, size: int) -> Any:
            closed = jax.make_jaxpr(whole_batch)(group_values, leaves.values, prep.constants, x)
            rows = _jitted(("batch", n_outputs), closed, build_batch)
            jac = rows(closed.consts, group_values, leaves.values, prep.constants, x)
            return stack(tuple(j[start:stop] for j in jac), stop - start)

        return train_jac

    def single(gv: Any, values: Any, consts: Any, xi: Any) -> Any:
        xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
        raw = prep.call(params_of(gv, values), consts, xb)
        return select_output(raw, output).reshape(-1)

    diff = jax.jacfwd if n_outputs > group.size else jax.jacrev

    def build(jaxpr: Any) -> Any:
        f = _as_function(jaxpr)

        def vmapped(jc: Any, gv: Any, values: Any, consts: Any, x: Any) -> Any:
            per = jax.vmap(diff(f, argnums=1), in_axes=(None, None, None, None, 0))
            return stack(per(jc, gv, values, consts, x), batch_size(x))

        return jax.jit(vmapped)

    state: dict[str, Any] = {}  # the traced forward pass and its jitted Jacobian

    def eval_jac(x: Any, start: int, stop: int, size: int) -> Any:
        if "fn" not in state:
            sample = jax.tree_util.tree_map(lambda a: a[0], slice_inputs(x, 0, 1))
            closed = jax.make_jaxpr(single)(group_values, leaves.values, prep.constants, sample)
            state["fn"] = _jitted(("sample", diff.__name__, n_outputs), closed, build)
            state["consts"] = closed.consts
        block = pad_batch(slice_inputs(x, start, stop), size)
        jac = state["fn"](state["consts"], group_values, leaves.values, prep.constants, block)
        return jac[:stop - start]

    return eval_jac


def assemble(prep: Prepared, leaves: Leaves, x: Any, request: KernelRequest, plan: BlockPlan,
             n_outputs: int) -> Any:
    """Accumulate the kernel over parameter groups and sample blocks."""
    import jax.numpy as jnp

    n = batch_size(x)
    traced = request.kernel == "traced"
    width = 1 if traced else n_outputs
    scale = 1.0 / n_outputs if traced else 1.0
    kernel = np.zeros((n * width, n * width), dtype=np.dtype(request.dtype))

    def rows(j: Any) -> Any:  # (b, O, P) -> (b, O·P) traced, (b·O, P) full
        return j.reshape(j.shape[0], -1) if traced else j.reshape(-1, j.shape[2])

    def product(a: Any, b: Any) -> Any:
        return np.asarray(scale * jnp.matmul(a, b.T, precision="highest"))

    for group in plan.groups:
        jac = make_jacobian(prep, leaves, group, request, n_outputs)
        chunks = plan.chunks(group, 0, n)
        size = max(b - a for a, b in chunks)

        def block_rows(a0: int, a1: int, jac: JacobianFn = jac, size: int = size,
                       group: Group = group) -> Any:
            parts = [jac(x, a, b, size) for a, b in plan.chunks(group, a0, a1)]
            return rows(jnp.concatenate(parts) if len(parts) > 1 else parts[0])

        blocks = plan.sample_blocks(group)
        for bi, (a0, a1) in enumerate(blocks):
            ra = block_rows(a0, a1)
            kernel[a0 * width:a1 * width, a0 * width:a1 * width] += product(ra, ra)
            for b0, b1 in blocks[bi + 1:]:
                block = product(ra, block_rows(b0, b1))
                kernel[a0 * width:a1 * width, b0 * width:b1 * width] += block
                kernel[b0 * width:b1 * width, a0 * width:a1 * width] += block.T
    check_finite(np.diagonal(kernel), n, width)
    return kernel


def jacobian_groups(model: Any, input_sets: tuple[Any, ...], request: KernelRequest,
                    device: Any) -> Iterator[tuple[Any, ...]]:
    """What ``JaxBackend.jacobians`` yields: per parameter group, the per-sample
    Jacobians ``(N_s, *S, P_group)`` of every input set as NumPy (the generic Jacobian
    path; call inside :func:`cvcore.backends.jax.setup.scope`). Several input sets are
    measured in eval mode only (batch statistics couple the samples of one batch)."""
    from cvcore.blocking import plan_blocks
    from cvcore.errors import InputError

    from .setup import as_inputs, prepare

    if len(input_sets) > 1 and request.train:
        raise InputError("expected train=False for a kernel between two input sets (batch "
                         "statistics of one batch do not apply to another), got train=True")
    s = prepare(model, input_sets[0], request, device, request.train)
    xs = [s.x] + [as_inputs(x, s.dtype, device) for x in input_sets[1:]]
    shapes = [output_shape(s.prep, x, request) for x in xs]
    if any(shape != shapes[0] for shape in shapes):
        raise InputError(f"expected input sets whose outputs have one per-sample shape, got "
                         f"{[list(sh) for sh in shapes]}")
    sizes = [batch_size(x) for x in xs]
    plan = plan_blocks(n_samples=sum(sizes), n_outputs=s.n_outputs, group_sizes=s.sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    for group in plan.groups:
        jac = make_jacobian(s.prep, s.leaves, group, request, s.n_outputs)
        out = []
        for x, n in zip(xs, sizes):
            chunks = [(0, n)] if request.train else plan.chunks(group, 0, n)
            size = max(b - a for a, b in chunks)
            parts = [np.asarray(jac(x, a, b, size)) for a, b in chunks]
            j = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out.append(j.reshape(n, *shapes[0], -1))
        yield tuple(out)


def output_shape(prep: Prepared, x: Any, request: KernelRequest) -> tuple[int, ...]:
    """One sample's output shape ``S`` (train mode on a batched model: the batch's
    output without its first axis), by ``jax.eval_shape`` (nothing is computed)."""
    jax = require("jax")

    first = slice_inputs(x, 0, 1)
    if request.train and prep.batched:
        first = x
    elif not prep.batched:
        first = jax.tree_util.tree_map(lambda a: a[0], first)
    shaped = jax.eval_shape(lambda p, c, xb: select_output(prep.call(p, c, xb), request.output),
                            prep.params, prep.constants, first)
    return tuple(int(d) for d in (shaped.shape[1:] if prep.batched else shaped.shape))
