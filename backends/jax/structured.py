"""Structured (per-layer) NTK for JAX: layer identities read off the model's jaxpr.

The kernel is a sum over parameter leaves, ``K = Σ_p J_p J_pᵀ``, so each leaf can be
measured its own way. The one-sample forward pass is traced to a jaxpr and every
trainable leaf is followed through it (:func:`cvcore.backends.jax.sites.analyse`):

* a leaf whose every use is, after layout-only steps (reshape, transpose, dtype
  conversion, size-1 broadcasts), the weight operand of a ``dot_general`` (dense layers,
  attention projections, einsums), of a ``conv_general_dilated`` (convolutions, measured
  on the input's patches; grouped and depthwise ones group by group) or the table of an
  embedding-style ``gather`` has a *rule*;
* every other leaf (biases, norm scales, weights inside ``scan`` or custom-derivative
  calls, weights in elementwise ops) is differentiated directly.

One jitted function per block of samples re-runs the jaxpr
(:func:`cvcore.backends.jax.jaxpr.evaluate`) with a
zero perturbation added at each ruled site's output, records each site's input ``a``,
and takes ``jacrev`` with respect to the perturbations and the directly differentiated
leaves together: the same batched backward passes give the output-gradients ``g`` of
every site and the Jacobian of every other leaf. A ruled leaf then contributes, per the
cheaper exact rule (:func:`cvcore.blocking.dense_costs`),

* ``pairs``: ``K_(io),(jp) = Σ_{s,t} (a_is·a_jt)(g_ios·g_jpt)``, never forming a gradient
  (``(A Aᵀ) ⊙ (G Gᵀ)`` with one position per sample);
* ``jac``: the gradient ``Σ_s g_s ⊗ a_s`` formed by one product and added to the Gram
  of the directly differentiated leaves; for a grouped convolution one product per group,
  ``Σ_s g_sg ⊗ a_sg`` (its only rule: XLA's CPU per-sample filter gradient of a depthwise
  convolution, the direct path, measured 12.5 CPU s for 2 samples of one 48×48×96 layer).

``implementation="auto"`` measures a leaf by its rule only where ``pairs`` is cheaper
than its Jacobian; ``"structured"`` uses the rules for every ruled leaf. A leaf used at
several sites (shared weights) concatenates its sites along the position axis, which is
exact; uses with different layouts send the leaf to the direct path. Train mode (batch
statistics couple the samples) uses the Jacobian path of :mod:`cvcore.backends.jax.jacobian`.

Memory: samples go in blocks whose features take at most half of the request's
``memory_budget`` (the last block padded, so one compilation serves all); pairs of
blocks are combined on the device and handed to NumPy block by block. When one sample's
features alone exceed that, the Jacobian path (with its parameter groups and output
blocks) is used instead.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from cvcore.blocking import plan_blocks
from cvcore.data_io import batch_size, slice_inputs
from cvcore.imports import require
from cvcore.outputs import check_finite
from cvcore.protocols import Implementation, KernelRequest

from . import setup
from .forms import Leaves, Prepared
from .jacobian import assemble
from .jaxpr import Traced, cached, evaluate, trace
from .rules import (
    Layout,
    choose,
    leaf_shape,
    make_diag,
    make_pair,
)
from .sites import activation, analyse


# --------------------------------------------------------------------------- features
def _leaf_features(layout: Layout, leaf: int, grads: dict[tuple[int, ...], Any],
                   record: dict[tuple[int, ...], Any], n_outputs: int) -> tuple[Any, Any]:
    """One sample's ``a`` ``(S, d_in)`` (ids ``(S,)``) and ``g`` ``(O, S, d_out)``; a
    grouped convolution's ``(S, G, d_in)`` and ``(O, S, G, d_out / G)``."""
    import jax.numpy as jnp

    sites = layout.sites[leaf]
    groups = sites[0].groups
    units = (sites[0].d_out,) if groups == 1 else (groups, sites[0].d_out // groups)
    gs = [jnp.transpose(grads[s.path], (0, *(1 + d for d in s.perm)))
          .reshape(n_outputs, s.s_len, *units) for s in sites]
    a = [record[s.path] for s in sites]
    if leaf in layout.bias:  # [W b] acts on [a 1]
        a = [jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1) for x in a]
    if len(sites) == 1:
        return a[0], gs[0]
    return jnp.concatenate(a, axis=0), jnp.concatenate(gs, axis=1)


def make_features(layout: Layout, jaxpr: Any, n_outputs: int) -> Any:
    """A jitted ``features(values, dynamic, consts, block)`` (see :class:`Traced`): for a
    block of samples, the formed
    gradient rows ``(b, O, P_rows)`` (direct and ``jac`` leaves) and the ``(a, g)`` of
    every ``pairs`` leaf, keyed by leaf."""
    jax = require("jax")
    import jax.numpy as jnp

    by_path = {s.path: s for s in layout.perturbed}

    def one(values: list[Any], dynamic: list[Any], consts: list[Any], xi: Any
            ) -> tuple[Any, dict[int, Any]]:
        def f(direct_values: list[Any], perts: dict[tuple[int, ...], Any]) -> Any:
            current = list(values)
            for k, i in enumerate(layout.direct):
                current[i] = direct_values[k]
            record: dict[tuple[int, ...], Any] = {}
            args = [*current, *dynamic, *jax.tree_util.tree_leaves(xi)]
            out = evaluate(jaxpr, consts, args, (), by_path, perts, record, activation)[0]
            return out.reshape(-1), record

        zeros = {s.path: jnp.zeros(s.out_shape, s.dtype) for s in by_path.values()}
        start = [values[i] for i in layout.direct]
        (jd, jp), record = jax.jacrev(f, argnums=(0, 1), has_aux=True)(start, zeros)
        rows = [j.reshape(n_outputs, -1) for j in jd]
        pairs: dict[int, tuple[Any, Any]] = {}
        for leaf, rule in layout.rules.items():
            a, g = _leaf_features(layout, leaf, jp, record, n_outputs)
            if rule == "jac":
                product = "osk,sd->okd" if a.ndim == 2 else "osgk,sgd->ogkd"
                rows.append(jnp.einsum(product, g, a).reshape(n_outputs, -1))
            else:
                pairs[leaf] = (a, g)
        dtype = values[0].dtype
        formed = jnp.concatenate(rows, axis=1) if rows else jnp.zeros((n_outputs, 0), dtype)
        return formed, pairs

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


# --------------------------------------------------------------------------- driver
#: Jitted (features, pair) functions of recent models, so that measuring many checkpoints
#: of one architecture compiles once. Keyed by the jaxpr's text (its structure, shapes and
#: literals; weights and constants are arguments) and everything else they close over.
_COMPILED: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()


def compiled(layout: Layout, jaxpr: Any, n_outputs: int, traced: bool, chunk: int,
             diagonal: bool = False) -> tuple[Any, Any]:
    """:func:`make_features` and :func:`make_pair` (:func:`make_diag` for the diagonal),
    from the cache when the same model structure was measured recently."""
    key = (str(jaxpr), tuple(sorted(layout.rules.items())), tuple(layout.direct),
           tuple(sorted(layout.bias.items())), n_outputs, traced, chunk, diagonal)
    return cached(_COMPILED, key, lambda: (
        make_features(layout, jaxpr, n_outputs),
        make_diag(layout) if diagonal else make_pair(layout, n_outputs, traced, chunk)))


def _on_cpu(x: Any) -> bool:
    """Whether the inputs live on a CPU device."""
    jax = require("jax")
    first = jax.tree_util.tree_leaves(x)[0]
    return all(d.platform == "cpu" for d in first.devices())


def _balanced(n: int, most: int) -> int:
    """The block size that splits ``n`` samples into as few blocks of at most ``most`` as
    possible, evenly: the last block is padded to the block size, so uneven blocks would
    compute padding (1024 samples in blocks of at most 945: two of 512, not 945 + 79).

    >>> _balanced(1024, 945), _balanced(1000, 1000), _balanced(7, 3)
    (512, 1000, 3)
    """
    blocks = -(-n // most)
    return -(-n // blocks)


def _per_sample_bytes(layout: Layout, n_outputs: int, itemsize: int) -> int:
    feats = sum(s_len * d_in + n_outputs * s_len * d_out
                for s_len, d_in, d_out in (leaf_shape(layout.sites[leaf], leaf in layout.bias)
                                           for leaf, r in layout.rules.items() if r == "pairs"))
    # the formed rows, the features, and about as much again for jacrev's temporaries
    return 2 * itemsize * (n_outputs * layout.row_width() + feats)


def _plan(prep: Prepared, leaves: Leaves, x: Any, request: KernelRequest, n_outputs: int,
          traced: bool, force: str | None = None, diagonal: bool = False
          ) -> tuple[Layout, Traced, list[Any]] | None:
    """Trace, analyse and choose: ``(layout, traced, trainable values)``, or ``None`` in
    train mode or when no leaf is to be measured by a rule."""
    if request.train:
        return None
    traced_fn = trace(prep, leaves, x, request.output)
    values = [leaves.values[i] for i in leaves.trainable]
    analysis = analyse(traced_fn.jaxpr, len(values))
    if not analysis.sites:
        return None
    layout = choose(analysis, [int(v.size) for v in values], batch_size(x), n_outputs, traced,
                    request.implementation, force, diagonal=diagonal, patches=_on_cpu(x))
    if not layout.rules:
        return None
    return layout, traced_fn, values


def attempt(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or ``None`` with a warning when it fails for a reason other than a
    cvcore error: the rules read JAX's jaxpr equations, whose details can change between
    JAX releases, and the Jacobian path then still measures the model."""
    import warnings

    from cvcore.errors import CVCoreError

    try:
        return fn(*args)
    except CVCoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure: fall back, say why
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"cvcore: the structured JAX path failed ({type(exc).__name__}: {first}); "
                      "using the Jacobian path", stacklevel=3)
        return None


def structured_kernel(prep: Prepared, leaves: Leaves, x: Any, request: KernelRequest, n_outputs: int,
                      force: str | None = None) -> np.ndarray | None:
    """The kernel from per-layer rules, or ``None`` to use the Jacobian path.

    Args:
        prep: the prepared model (:class:`cvcore.backends.jax.forms.Prepared`), its
            parameters already in the request's dtype and on its device.
        leaves: its flattened parameters (:func:`cvcore.backends.jax.forms.flatten_params`).
        x: the inputs, as arrays on the device.
        request: the :class:`cvcore.protocols.KernelRequest`.
        n_outputs: outputs per sample ``O``.
        force: ``"pairs"`` or ``"jac"`` imposes that rule on every ruled leaf (tests).

    Returns:
        The kernel as a NumPy array (traced ``N × N`` divided by ``O``, or full
        ``N·O × N·O`` with row ``i·O + o``); ``None`` in train mode, when no leaf is
        measured by a rule, or when one sample's features exceed half the budget.
    """
    n = batch_size(x)
    traced = request.kernel == "traced"
    planned = _plan(prep, leaves, x, request, n_outputs, traced, force=force)
    if planned is None:
        return None
    layout, fn, values = planned
    itemsize = np.dtype(request.dtype).itemsize
    budget = int(request.memory_budget)
    per_sample = _per_sample_bytes(layout, n_outputs, itemsize)
    if per_sample > budget // 2:
        return None
    width = 1 if traced else n_outputs
    pair_limit = max(1, int(math.sqrt(budget / (6 * itemsize))) // width)
    size = _balanced(n, max(1, min(n, (budget // 2) // per_sample, pair_limit)))
    s_max = max(leaf_shape(layout.sites[leaf])[0] for leaf in layout.rules)
    per_position = size * size * s_max * (1 if traced else n_outputs * n_outputs + 1) * itemsize
    chunk = max(1, (budget // 4) // max(1, per_position))
    features, pair = compiled(layout, fn.jaxpr, n_outputs, traced, chunk)
    blocks = [(a, min(a + size, n)) for a in range(0, n, size)]
    kernel = np.zeros((n * width, n * width), dtype=np.dtype(request.dtype))

    def block_features(a0: int, a1: int) -> Any:
        return features(values, fn.dynamic, fn.consts,
                        setup.pad_batch(slice_inputs(x, a0, a1), size))

    for i, (a0, a1) in enumerate(blocks):
        fa = block_features(a0, a1)
        ra = slice(a0 * width, a1 * width)
        kernel[ra, ra] = np.asarray(pair(fa, fa))[:(a1 - a0) * width, :(a1 - a0) * width]
        for b0, b1 in blocks[i + 1:]:
            rb = slice(b0 * width, b1 * width)
            block = np.asarray(pair(fa, block_features(b0, b1)))[:(a1 - a0) * width,
                                                                  :(b1 - b0) * width]
            kernel[ra, rb] = block
            kernel[rb, ra] = block.T
    check_finite(np.diagonal(kernel), n, width)
    return kernel


def structured_diagonal(prep: Prepared, leaves: Leaves, x: Any, request: KernelRequest,
                        n_outputs: int) -> np.ndarray | None:
    """``‖J_io‖²`` as ``(N, O)`` NumPy from the per-layer rules, or ``None`` to use the
    per-sample Jacobians (train mode, no rule worth using, features over the budget).

    A ``pairs`` leaf adds ``Σ_{s,t} (a_is·a_it)(g_ios·g_iot)`` (with one position,
    ``‖a_i‖² ‖g_io‖²``), the others the squared norms of their formed gradients; nothing
    of size ``N²`` is formed.
    """
    n = batch_size(x)
    planned = _plan(prep, leaves, x, request, n_outputs, False, diagonal=True)
    if planned is None:
        return None
    layout, fn, values = planned
    itemsize = np.dtype(request.dtype).itemsize
    per_sample = _per_sample_bytes(layout, n_outputs, itemsize)
    if per_sample > int(request.memory_budget) // 2:
        return None
    size = _balanced(n, max(1, min(n, (int(request.memory_budget) // 2) // per_sample)))
    features, diag = compiled(layout, fn.jaxpr, n_outputs, False, 1, diagonal=True)
    out = np.zeros((n, n_outputs), dtype=np.dtype(request.dtype))
    for a0 in range(0, n, size):
        a1 = min(a0 + size, n)
        block = setup.pad_batch(slice_inputs(x, a0, a1), size)
        out[a0:a1] = np.asarray(diag(features(values, fn.dynamic, fn.consts, block)))[:a1 - a0]
    return out


def kernel_of(prep: Prepared, leaves: Leaves, x: Any, request: KernelRequest, n_outputs: int
              ) -> np.ndarray[Any, Any]:
    """The kernel over ``leaves.trainable``: by the layer rules when they apply (and
    ``implementation`` allows), else by the Jacobian path
    (:func:`cvcore.backends.jax.jacobian.assemble`)."""
    if request.implementation != Implementation.JACOBIAN:
        kernel = attempt(structured_kernel, prep, leaves, x, request, n_outputs)
        if kernel is not None:
            return np.asarray(kernel)
    sizes = [int(leaves.values[i].size) for i in leaves.trainable]
    plan = plan_blocks(n_samples=batch_size(x), n_outputs=n_outputs, group_sizes=sizes,
                       itemsize=np.dtype(request.dtype).itemsize, budget=request.memory_budget)
    return assemble(prep, leaves, x, request, plan, n_outputs)
