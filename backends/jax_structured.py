"""Structured (per-layer) NTK for JAX: layer identities read off the model's jaxpr.

The kernel is a sum over parameter leaves, ``K = Σ_p J_p J_pᵀ``, so each leaf can be
measured its own way. The one-sample forward pass is traced to a jaxpr and every
trainable leaf is followed through it (:func:`analyse`):

* a leaf whose every use is, after layout-only steps (reshape, transpose, dtype
  conversion, size-1 broadcasts), the weight operand of a ``dot_general`` (dense layers,
  attention projections, einsums), of a ``conv_general_dilated`` (convolutions, measured
  on the input's patches) or the table of an embedding-style ``gather`` has a *rule*;
* every other leaf (biases, norm scales, weights inside ``scan`` or custom-derivative
  calls, weights in elementwise ops) is differentiated directly.

One jitted function per block of samples re-runs the jaxpr (:func:`evaluate`) with a
zero perturbation added at each ruled site's output, records each site's input ``a``,
and takes ``jacrev`` with respect to the perturbations and the directly differentiated
leaves together: the same batched backward passes give the output-gradients ``g`` of
every site and the Jacobian of every other leaf. A ruled leaf then contributes, per the
cheaper exact rule (:func:`cvcore.blocking.dense_costs`),

* ``pairs``: ``K_(io),(jp) = Σ_{s,t} (a_is·a_jt)(g_ios·g_jpt)``, never forming a gradient
  (``(A Aᵀ) ⊙ (G Gᵀ)`` with one position per sample);
* ``jac``: the gradient ``Σ_s g_s ⊗ a_s`` formed by one product and added to the Gram
  of the directly differentiated leaves.

``implementation="auto"`` measures a leaf by its rule only where ``pairs`` is cheaper
than its Jacobian; ``"structured"`` uses the rules for every ruled leaf. A leaf used at
several sites (shared weights) concatenates its sites along the position axis, which is
exact; uses with different layouts send the leaf to the direct path. Train mode (batch
statistics couple the samples) uses the Jacobian path of :mod:`jax_backend`.

Memory: samples go in blocks whose features take at most half of the request's
``memory_budget`` (the last block padded, so one compilation serves all); pairs of
blocks are combined on the device and handed to NumPy block by block. When one sample's
features alone exceed that, the Jacobian path (with its parameter groups and output
blocks) is used instead.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np
from cvcore.backends import jax_backend as jb

from cvcore.blocking import dense_costs
from cvcore.protocols import Implementation, KernelRequest

#: Primitives whose sub-jaxpr is evaluated equation by equation (call boundaries only).
INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat",
                    "remat2"})
#: Primitives that keep a parameter a parameter (a permutation of its entries, or a cast).
LAYOUT = frozenset({"reshape", "transpose", "convert_element_type", "copy", "copy_p",
                    "squeeze", "expand_dims", "broadcast_in_dim", "reduce_precision"})


@dataclasses.dataclass(frozen=True)
class Origin:
    """A value that is a trainable leaf up to layout: leaf position and layout steps."""

    leaf: int
    chain: tuple[Any, ...] = ()
    #: axes of the value that repeat the leaf (broadcasts); ``None`` once a reshape after
    #: a broadcast makes that unknown (the value can then not be a bias).
    repeated: frozenset[int] | None = frozenset()


@dataclasses.dataclass(frozen=True)
class Site:
    """One ruled use of a leaf: an equation (by its path through nested jaxprs).

    Attributes:
        path: equation indices from the top-level jaxpr down through inlined calls.
        kind: ``"dense"``, ``"conv"`` or ``"embedding"``.
        leaf: position of the leaf among the trainable leaves.
        side: operand index of the parameter.
        signature: what every use of one leaf must share to be concatenated.
        out_shape: the equation's output shape (one sample); ``dtype`` its dtype.
        perm: the output's axes ordered positions first, the weight's output axes last.
        s_len: positions ``S`` (one sample); ``d_in``, ``d_out``: the weight as a
            ``d_in × d_out`` map (``d_in = 1`` for an embedding, whose input is an id).
        n_out_axes: how many output axes (the last ones of ``perm``) make up ``d_out``.
    """

    path: tuple[int, ...]
    kind: str
    leaf: int
    side: int
    signature: tuple[Any, ...]
    out_shape: tuple[int, ...]
    dtype: Any
    perm: tuple[int, ...]
    s_len: int
    d_in: int
    d_out: int
    n_out_axes: int = 1


def _site(eqn: Any, path: tuple[int, ...], kind: str, origin: Origin, side: int,
          signature: tuple[Any, ...], perm: tuple[int, ...], d_in: int, d_out: int,
          n_out_axes: int = 1) -> Site:
    out = eqn.outvars[0].aval
    shape = tuple(out.shape)
    return Site(path, kind, origin.leaf, side, (kind, origin.chain, *signature), shape,
                out.dtype, perm, math.prod(shape) // max(1, d_out), d_in, d_out, n_out_axes)


@dataclasses.dataclass
class Analysis:
    """Sites of every ruled leaf, the leaves measured directly, and the biases folded into
    their weights; a leaf the output does not depend on is in none of them."""

    sites: list[Site]
    direct: set[int]
    bias: dict[int, int] = dataclasses.field(default_factory=dict)  # weight -> its bias


# --------------------------------------------------------------------------- jaxpr walk
def _core() -> Any:
    from jax.extend import core

    return core


def _inline(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call equation evaluated inline, else ``None``."""
    if eqn.primitive.name not in INLINE:
        return None
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if sub is None:
        return None
    if hasattr(sub, "consts"):  # a ClosedJaxpr
        return sub.jaxpr, list(sub.consts)
    return sub, []


def _layout_step(eqn: Any) -> tuple[Any, ...] | None:
    """The step as a hashable record when ``eqn`` only rearranges or casts its input."""
    name = eqn.primitive.name
    if name not in LAYOUT or len(eqn.invars) != 1:
        return None
    aval_in, aval_out = eqn.invars[0].aval, eqn.outvars[0].aval
    if math.prod(aval_in.shape) != math.prod(aval_out.shape):
        return None
    if name == "reshape" and eqn.params.get("dimensions") is not None:
        return None
    if not np.issubdtype(np.dtype(aval_out.dtype), np.inexact):
        return None
    return (name, tuple(aval_out.shape), tuple(eqn.params.get("permutation", ())))


def _dense_site(eqn: Any, side: int, origin: Origin, path: tuple[int, ...]) -> Site | None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    shape = eqn.invars[side].aval.shape
    contract = tuple(rc if side == 1 else lc)
    free = tuple(d for d in range(len(shape)) if d not in contract)
    ndim, nf = len(eqn.outvars[0].aval.shape), len(free)
    # dot_general's output holds lhs free axes, then rhs free axes
    perm = tuple(range(ndim)) if side == 1 else (*range(nf, ndim), *range(nf))
    return _site(eqn, path, "dense", origin, side, (contract, free), perm,
                 math.prod(shape[d] for d in contract), math.prod(shape[d] for d in free), nf)


def _conv_site(eqn: Any, side: int, origin: Origin, path: tuple[int, ...]) -> Site | None:
    p = eqn.params
    if side != 1 or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    dn = p["dimension_numbers"]
    rhs = tuple(eqn.invars[1].aval.shape)
    out = dn.out_spec
    d_out = rhs[dn.rhs_spec[0]]
    return _site(eqn, path, "conv", origin, 1, (rhs, tuple(dn.rhs_spec), tuple(dn.lhs_spec)),
                 (out[0], *out[2:], out[1]), math.prod(rhs) // d_out, d_out)


def _gather_site(eqn: Any, side: int, origin: Origin, path: tuple[int, ...]) -> Site | None:
    p = eqn.params
    dn = p["dimension_numbers"]
    table = tuple(eqn.invars[0].aval.shape)
    out_ndim = len(eqn.outvars[0].aval.shape)
    simple = (side == 0 and len(table) == 2 and tuple(dn.offset_dims) == (out_ndim - 1,)
              and tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
              and not tuple(getattr(dn, "operand_batching_dims", ()))
              and tuple(p["slice_sizes"]) == (1, table[1])
              and tuple(eqn.invars[1].aval.shape[-1:]) == (1,))
    if not simple:
        return None
    return _site(eqn, path, "embedding", origin, 0, (table,), tuple(range(out_ndim)), 1,
                 table[1])


SITE_RULES = {"dot_general": _dense_site, "conv_general_dilated": _conv_site,
              "gather": _gather_site}


@dataclasses.dataclass
class _Walk:
    """What :func:`_walk` collects."""

    sizes: list[int]
    sites: list[Site] = dataclasses.field(default_factory=list)
    tainted: set[int] = dataclasses.field(default_factory=set)
    used: set[int] = dataclasses.field(default_factory=set)
    outputs: dict[Any, Site] = dataclasses.field(default_factory=dict)  # site output vars
    biases: list[tuple[int, tuple[int, ...]]] = dataclasses.field(default_factory=list)


def _broadcast(eqn: Any, origin: Origin) -> Origin:
    """A leaf through ``broadcast_in_dim``: the new axes and stretched size-1 axes repeat it."""
    dims = tuple(eqn.params["broadcast_dimensions"])
    shape_in, shape_out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    step = ("broadcast_in_dim", tuple(shape_out), dims)
    if origin.repeated is None:
        return dataclasses.replace(origin, chain=(*origin.chain, step))
    repeated = {dims[a] for a in origin.repeated}
    repeated |= {a for a in range(len(shape_out)) if a not in dims and shape_out[a] > 1}
    repeated |= {dims[a] for a in range(len(shape_in)) if shape_in[a] == 1 and shape_out[dims[a]] > 1}
    return dataclasses.replace(origin, chain=(*origin.chain, step), repeated=frozenset(repeated))


def _rearranged(eqn: Any, origin: Origin, step: tuple[Any, ...]) -> Origin:
    """A leaf through a layout step, its repeated axes followed where that is possible."""
    repeated = origin.repeated
    name = eqn.primitive.name
    if repeated and name == "transpose":
        perm = tuple(eqn.params["permutation"])
        repeated = frozenset(perm.index(a) for a in repeated)
    elif repeated and name not in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        repeated = None
    return dataclasses.replace(origin, chain=(*origin.chain, step), repeated=repeated)


def _is_bias(eqn: Any, side: int, origin: Origin, site: Site, size: int) -> bool:
    """Whether ``add(site output, leaf)`` adds one entry of the leaf per output unit of the
    site (``d_out``), the same at every position: a bias, which the site's rule absorbs
    as an input column of ones."""
    out = tuple(eqn.outvars[0].aval.shape)
    shape = tuple(eqn.invars[side].aval.shape)
    if site.kind == "embedding" or origin.repeated is None or out != site.out_shape \
            or len(shape) != len(out) or size != site.d_out:
        return False
    units = set(site.perm[len(site.perm) - site.n_out_axes:])
    for axis, (b, o) in enumerate(zip(shape, out)):
        if axis in units and (b != o or axis in origin.repeated):
            return False
        if axis not in units and b != 1 and axis not in origin.repeated:
            return False
    return True


def _walk(jaxpr: Any, origins: list[Origin | None], path: tuple[int, ...], w: _Walk
          ) -> list[Origin | None]:
    """Follow leaves through ``jaxpr``; returns the origins of its outputs."""
    core = _core()
    env: dict[Any, Origin] = {v: o for v, o in zip(jaxpr.invars, origins) if o is not None}

    def origin_of(v: Any) -> Origin | None:
        return None if isinstance(v, core.Literal) else env.get(v)

    for k, eqn in enumerate(jaxpr.eqns):
        here = (*path, k)
        ins = [origin_of(v) for v in eqn.invars]
        found = [o for o in ins if o is not None]
        if not found:
            continue
        w.used.update(o.leaf for o in found)
        sub = _inline(eqn)
        if sub is not None:
            outs = _walk(sub[0], ins, here, w)
            env.update({v: o for v, o in zip(eqn.outvars, outs) if o is not None})
            continue
        name = eqn.primitive.name
        if name == "broadcast_in_dim" and len(eqn.invars) == 1:
            env[eqn.outvars[0]] = _broadcast(eqn, found[0])
            continue
        step = _layout_step(eqn)
        if step is not None:
            env[eqn.outvars[0]] = _rearranged(eqn, found[0], step)
            continue
        side = next(i for i, o in enumerate(ins) if o is not None)
        if name == "add" and len(found) == 1 and len(eqn.invars) == 2:
            other = eqn.invars[1 - side]
            site = None if isinstance(other, core.Literal) else w.outputs.get(other)
            if site is not None and _is_bias(eqn, side, found[0], site, w.sizes[found[0].leaf]):
                w.biases.append((found[0].leaf, site.path))
                continue
        rule = SITE_RULES.get(name)
        whole = len(found) == 1 and found[0].repeated == frozenset()  # not a broadcast copy
        site = rule(eqn, side, found[0], here) if rule is not None and whole else None
        if site is None:
            w.tainted.update(o.leaf for o in found)
        else:
            w.sites.append(site)
            w.outputs[eqn.outvars[0]] = site
    return [origin_of(v) for v in jaxpr.outvars]


def _fold_biases(w: _Walk, ruled: list[Site]) -> dict[int, int]:
    """Biases measured with their weight: the same bias leaf after every site of one ruled
    weight, and used nowhere else."""
    by_path = {s.path: s for s in ruled}
    uses: dict[int, list[tuple[int, ...]]] = {}
    for leaf, site_path in w.biases:
        uses.setdefault(leaf, []).append(site_path)
    paths_of: dict[int, set[tuple[int, ...]]] = {}
    for site in ruled:
        paths_of.setdefault(site.leaf, set()).add(site.path)
    folded: dict[int, int] = {}
    for bias, site_paths in uses.items():
        if bias in w.tainted or any(s.leaf == bias for s in w.sites):
            continue
        weights = {by_path[p].leaf for p in site_paths if p in by_path}
        if len(weights) != 1 or len(site_paths) != len(set(site_paths)):
            continue
        weight = weights.pop()
        if set(site_paths) == paths_of[weight] and weight not in folded:
            folded[weight] = bias
    return folded


def analyse(jaxpr: Any, n_leaves: int) -> Analysis:
    """Sites, folded biases and directly measured leaves of a jaxpr whose first
    ``n_leaves`` inputs are the trainable leaves."""
    origins: list[Origin | None] = [Origin(i) for i in range(n_leaves)]
    origins += [None] * (len(jaxpr.invars) - n_leaves)
    w = _Walk(sizes=[math.prod(v.aval.shape) for v in jaxpr.invars[:n_leaves]])
    outs = _walk(jaxpr, origins, (), w)
    w.tainted.update(o.leaf for o in outs if o is not None)
    w.used.update(o.leaf for o in outs if o is not None)
    signatures: dict[int, set[tuple[Any, ...]]] = {}
    for s in w.sites:
        signatures.setdefault(s.leaf, set()).add(s.signature)
    w.tainted.update(leaf for leaf, sig in signatures.items() if len(sig) > 1)
    ruled = [s for s in w.sites if s.leaf not in w.tainted]
    bias = _fold_biases(w, ruled)
    measured = {s.leaf for s in ruled} | set(bias.values())
    direct = {i for i in range(n_leaves) if i in w.used and i not in measured}
    return Analysis(sites=ruled, direct=direct, bias=bias)


# --------------------------------------------------------------------------- evaluation
def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
    """Apply one equation's primitive, as ``jax.core.eval_jaxpr`` does."""
    import contextlib

    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: list[Any] = []
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    with manager if manager is not None else contextlib.nullcontext():
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _activation(site: Site, eqn: Any, invals: list[Any]) -> Any:
    """The site's input for one sample: ``(S, d_in)``; an embedding's ids ``(S,)``, -1
    where the gather reads nothing (out of range)."""
    import jax.numpy as jnp
    from jax import lax

    if site.kind == "dense":
        u = invals[1 - site.side]
        (lc, rc), _ = eqn.params["dimension_numbers"]
        contract = tuple(rc if site.side == 0 else lc)
        free = tuple(d for d in range(u.ndim) if d not in contract)
        return jnp.transpose(u, (*free, *contract)).reshape(site.s_len, site.d_in)
    if site.kind == "conv":
        lhs, rhs = invals
        p = eqn.params
        dn = p["dimension_numbers"]
        patches = lax.conv_general_dilated_patches(
            lhs, tuple(rhs.shape[d] for d in dn.rhs_spec[2:]), p["window_strides"], p["padding"],
            p["lhs_dilation"], p["rhs_dilation"], dimension_numbers=dn,
            precision=lax.Precision.HIGHEST)
        return jnp.transpose(patches, site.perm).reshape(site.s_len, site.d_in)
    ids = invals[1][..., 0].reshape(-1)
    vocab = site.signature[2][0]
    mode = getattr(eqn.params.get("mode"), "name", str(eqn.params.get("mode")))
    if "CLIP" in mode:
        return jnp.clip(ids, 0, vocab - 1)
    return jnp.where((ids >= 0) & (ids < vocab), ids, -1)


def evaluate(jaxpr: Any, consts: list[Any], args: list[Any], path: tuple[int, ...],
             sites: dict[tuple[int, ...], Site], perts: dict[tuple[int, ...], Any],
             record: dict[tuple[int, ...], Any]) -> list[Any]:
    """Evaluate ``jaxpr``, adding ``perts[path]`` to each site's output and storing its
    input in ``record[path]``; call equations in :data:`INLINE` are evaluated inline."""
    core = _core()
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for k, eqn in enumerate(jaxpr.eqns):
        here = (*path, k)
        invals = [read(v) for v in eqn.invars]
        sub = _inline(eqn)
        if sub is not None:
            outs = evaluate(sub[0], sub[1], invals, here, sites, perts, record)
        else:
            outs = _bind(eqn, invals)
            site = sites.get(here)
            if site is not None:
                record[here] = _activation(site, eqn, invals)
                outs = [outs[0] + perts[here]]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------- features
@dataclasses.dataclass
class Layout:
    """The static shape of the computation: which leaf goes which way."""

    sites: dict[int, list[Site]]  # leaf -> its sites, for leaves measured by a rule
    rules: dict[int, str]  # leaf -> "pairs" or "jac"
    direct: list[int]  # leaves differentiated directly
    sizes: list[int]  # size of every trainable leaf
    bias: dict[int, int] = dataclasses.field(default_factory=dict)  # ruled weight -> bias

    @property
    def perturbed(self) -> list[Site]:
        return [s for leaf in self.rules for s in self.sites[leaf]]

    def row_width(self) -> int:
        """Parameters whose per-sample gradients are formed (direct and ``jac`` leaves,
        with their biases)."""
        jac = [i for i, r in self.rules.items() if r == "jac"]
        return (sum(self.sizes[i] for i in self.direct) + sum(self.sizes[i] for i in jac)
                + sum(self.sizes[self.bias[i]] for i in jac if i in self.bias))


def _leaf_shape(sites: list[Site], bias: bool = False) -> tuple[int, int, int]:
    """``(S, d_in, d_out)`` of a ruled leaf, its sites' positions concatenated; a folded
    bias is one more input (a column of ones)."""
    return sum(s.s_len for s in sites), sites[0].d_in + int(bias), sites[0].d_out


def _diagonal_costs(n_outputs: int, s_len: int, d_in: int, d_out: int, size: int
                    ) -> dict[str, float]:
    """Per-sample multiply-adds of a leaf's share of ``‖J_io‖²``: by ``pairs`` (Gram
    matrices over positions) and by forming the gradient (``jac``, as directly)."""
    return {"pairs": float(s_len * s_len * (d_in + n_outputs * d_out + n_outputs)),
            "jac": float(n_outputs * (s_len * d_in * d_out + size))}


def choose(analysis: Analysis, sizes: list[int], n: int, n_outputs: int, traced: bool,
           implementation: Implementation, force: str | None = None,
           diagonal: bool = False, patches: bool = False) -> Layout:
    """Decide per leaf: its rule (``pairs`` / ``jac``) or direct differentiation.

    ``auto`` keeps a rule only where ``pairs`` costs fewer multiply-adds than the leaf's
    Jacobian Gram; ``structured`` keeps every rule, choosing the cheaper of the two
    exact rules (an embedding always uses ``pairs``). ``force`` (tests) imposes a rule.
    ``diagonal``: the costs of the kernel's diagonal alone (:func:`_diagonal_costs`).
    ``patches``: under ``auto``, a convolution whose ``pairs`` rule does not pay forms
    its per-sample gradients from the input's patches (``jac``) rather than being
    differentiated directly. Set on the CPU, where that measured 1.5–1.7× faster than
    XLA's per-sample filter gradients (``benchmarks/run.py`` CNN, N = 64 and 256);
    on a GPU the direct path is kept (PyTorch measured its patch rule slower there).
    """
    by_leaf: dict[int, list[Site]] = {}
    for s in analysis.sites:
        by_leaf.setdefault(s.leaf, []).append(s)
    rules: dict[int, str] = {}
    direct = set(analysis.direct)
    for leaf, sites in by_leaf.items():
        bias = analysis.bias.get(leaf)
        s_len, d_in, d_out = _leaf_shape(sites, bias is not None)
        size = sizes[leaf] + (0 if bias is None else sizes[bias])
        if diagonal:
            costs = _diagonal_costs(n_outputs, s_len, d_in, d_out, size)
            gram = costs["jac"]
        else:
            costs = dense_costs(n, n, n_outputs, s_len, d_in, d_out, traced)
            gram = float(n * n * n_outputs * size * (1 if traced else n_outputs))
        embedding = sites[0].kind == "embedding"
        if force is not None:
            rules[leaf] = "pairs" if embedding else force
        elif implementation == Implementation.STRUCTURED:
            rules[leaf] = "pairs" if embedding or costs["pairs"] < costs["jac"] else "jac"
        elif costs["pairs"] < gram:
            rules[leaf] = "pairs"
        elif patches and sites[0].kind == "conv":
            rules[leaf] = "jac"
        else:
            direct.add(leaf)
            if bias is not None:
                direct.add(bias)
    return Layout({k: by_leaf[k] for k in rules}, rules, sorted(direct), sizes,
                  {k: v for k, v in analysis.bias.items() if k in rules})


def _leaf_features(layout: Layout, leaf: int, grads: dict[tuple[int, ...], Any],
                   record: dict[tuple[int, ...], Any], n_outputs: int) -> tuple[Any, Any]:
    """One sample's ``a`` ``(S, d_in)`` (ids ``(S,)``) and ``g`` ``(O, S, d_out)``."""
    import jax.numpy as jnp

    sites = layout.sites[leaf]
    gs = [jnp.transpose(grads[s.path], (0, *(1 + d for d in s.perm)))
          .reshape(n_outputs, s.s_len, s.d_out) for s in sites]
    a = [record[s.path] for s in sites]
    if leaf in layout.bias:  # [W b] acts on [a 1]
        a = [jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1) for x in a]
    if len(sites) == 1:
        return a[0], gs[0]
    return jnp.concatenate(a, axis=0), jnp.concatenate(gs, axis=1)


def make_features(layout: Layout, jaxpr: Any, n_outputs: int) -> Any:
    """A jitted ``features(values, dynamic, consts, block)`` (see :class:`Traced`): for a
    block of samples, the formed
    gradient rows ``(b, O, P_rows)`` (direct and ``jac`` leaves) and the ``(a, g)`` of
    every ``pairs`` leaf, keyed by leaf."""
    jax = jb._jax()
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
            out = evaluate(jaxpr, consts, args, (), by_path, perts, record)[0]
            return out.reshape(-1), record

        zeros = {s.path: jnp.zeros(s.out_shape, s.dtype) for s in by_path.values()}
        start = [values[i] for i in layout.direct]
        (jd, jp), record = jax.jacrev(f, argnums=(0, 1), has_aux=True)(start, zeros)
        rows = [j.reshape(n_outputs, -1) for j in jd]
        pairs: dict[int, tuple[Any, Any]] = {}
        for leaf, rule in layout.rules.items():
            a, g = _leaf_features(layout, leaf, jp, record, n_outputs)
            if rule == "jac":
                rows.append(jnp.einsum("osk,sd->okd", g, a).reshape(n_outputs, -1))
            else:
                pairs[leaf] = (a, g)
        dtype = values[0].dtype
        formed = jnp.concatenate(rows, axis=1) if rows else jnp.zeros((n_outputs, 0), dtype)
        return formed, pairs

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


def _pairs_gram(f1: tuple[Any, Any], f2: tuple[Any, Any], embedding: bool, traced: bool,
                chunk: int) -> Any:
    """``Σ_{s,t} (a_is·a_jt)(g_ios·g_jpt)`` for a block pair, ``chunk`` positions of the
    first block at a time: traced ``(b1, b2)`` (÷O), full ``(b1·O, b2·O)``."""
    import jax.numpy as jnp
    from jax import lax

    (a1, g1), (a2, g2) = f1, f2
    b1, n_out, s_len, d_out = g1.shape
    b2, s2 = g2.shape[0], g2.shape[2]
    hi = lax.Precision.HIGHEST

    def inputs(rows: slice) -> Any:  # (b1, s, b2, S2)
        if embedding:
            i1 = a1[:, rows][:, :, None, None]
            return ((i1 == a2[None, None]) & (i1 >= 0)).astype(g1.dtype)
        return jnp.einsum("isd,jtd->isjt", a1[:, rows], a2, precision=hi)

    if s_len == 1 and s2 == 1:
        aa = inputs(slice(None)).reshape(b1, b2)
        if traced:
            return jnp.matmul(g1.reshape(b1, -1), g2.reshape(b2, -1).T, precision=hi) * aa / n_out
        gg = jnp.matmul(g1.reshape(b1 * n_out, d_out), g2.reshape(b2 * n_out, d_out).T,
                        precision=hi).reshape(b1, n_out, b2, n_out)
        return (gg * aa[:, None, :, None]).reshape(b1 * n_out, b2 * n_out)
    total = None
    for s0 in range(0, s_len, chunk):
        rows = slice(s0, min(s_len, s0 + chunk))
        aa = inputs(rows)
        if traced:
            gg = jnp.einsum("iosk,jotk->isjt", g1[:, :, rows], g2, precision=hi)
            part = jnp.einsum("isjt,isjt->ij", aa, gg, precision=hi) / n_out
        else:
            gg = jnp.einsum("iosk,jptk->iosjpt", g1[:, :, rows], g2, precision=hi)
            part = jnp.einsum("iosjpt,isjt->iojp", gg, aa, precision=hi).reshape(
                b1 * n_out, b2 * n_out)
        total = part if total is None else total + part
    return total


def make_pair(layout: Layout, n_outputs: int, traced: bool, chunk: int) -> Any:
    """A jitted ``pair(features_a, features_b)``: their kernel block."""
    jax = jb._jax()
    import jax.numpy as jnp

    embedding = {leaf: sites[0].kind == "embedding" for leaf, sites in layout.sites.items()}

    def pair(fa: Any, fb: Any) -> Any:
        (ra, pa), (rb, pb) = fa, fb
        b1, b2 = ra.shape[0], rb.shape[0]
        if traced:
            k = jnp.matmul(ra.reshape(b1, -1), rb.reshape(b2, -1).T,
                           precision=jax.lax.Precision.HIGHEST) / n_outputs
        else:
            k = jnp.matmul(ra.reshape(b1 * n_outputs, -1), rb.reshape(b2 * n_outputs, -1).T,
                           precision=jax.lax.Precision.HIGHEST)
        for leaf in pa:
            k = k + _pairs_gram(pa[leaf], pb[leaf], embedding[leaf], traced, chunk)
        return k

    return jax.jit(pair)


def make_diag(layout: Layout) -> Any:
    """A jitted ``diag(features)``: ``‖J_io‖²`` ``(b, O)`` of a block of samples."""
    jax = jb._jax()
    import jax.numpy as jnp

    embedding = {leaf: sites[0].kind == "embedding" for leaf, sites in layout.sites.items()}
    hi = jax.lax.Precision.HIGHEST

    def diag(f: Any) -> Any:
        rows, pairs = f
        d = jnp.sum(rows * rows, axis=2)
        for leaf, (a, g) in pairs.items():
            if embedding[leaf]:
                aa = ((a[:, :, None] == a[:, None, :]) & (a[:, :, None] >= 0)).astype(g.dtype)
            else:
                aa = jnp.einsum("isd,itd->ist", a, a, precision=hi)
            gg = jnp.einsum("iosk,iotk->iost", g, g, precision=hi)
            d = d + jnp.einsum("iost,ist->io", gg, aa, precision=hi)
        return d

    return jax.jit(diag)


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
    return jb.cached(_COMPILED, key, lambda: (
        make_features(layout, jaxpr, n_outputs),
        make_diag(layout) if diagonal else make_pair(layout, n_outputs, traced, chunk)))


@dataclasses.dataclass
class Traced:
    """A model's one-sample forward pass as a jaxpr.

    Its inputs are the trainable leaves, then ``dynamic`` (this call's other arrays: the
    parameter tree's non-trainable array leaves and the model's constants, such as batch
    statistics), then the sample's arrays; ``consts`` are arrays the function itself
    closes over. ``n_outputs`` is O.
    """

    jaxpr: Any
    consts: list[Any]
    dynamic: list[Any]

    @property
    def n_outputs(self) -> int:
        return int(math.prod(self.jaxpr.outvars[0].aval.shape))


#: Traces of recent models, keyed by the model's function object (flax module or
#: ``apply_fn``, held here so its id stays unique) and every input's shape and dtype,
#: as ``jax.jit`` keys its own traces: a function is assumed to compute the same thing
#: each time it is called on the same shapes.
_TRACES: collections.OrderedDict[Any, tuple[Any, Any, list[Any]]] = collections.OrderedDict()


def _avals(tree: Any) -> tuple[Any, ...]:
    jax = jb._jax()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(np.shape(v)), str(v.dtype)) for v in leaves))


def trace(prep: Any, leaves: Any, x: Any, output: Any) -> Traced:
    """The one-sample forward pass as a :class:`Traced` jaxpr (from the cache when the
    same function was traced on the same shapes)."""
    jax = jb._jax()
    trainable = set(leaves.trainable)
    values = [leaves.values[i] for i in leaves.trainable]
    others = [v for i, v in enumerate(leaves.values) if i not in trainable]
    extra, extra_def = jax.tree_util.tree_flatten((others, prep.constants))
    arrays = [k for k, v in enumerate(extra) if isinstance(v, (jax.Array, np.ndarray))]
    dynamic = [extra[k] for k in arrays]

    def single(values: list[Any], dyn: list[Any], xi: Any) -> Any:
        flat = list(extra)
        for j, k in enumerate(arrays):
            flat[k] = dyn[j]
        rest, constants = jax.tree_util.tree_unflatten(extra_def, flat)
        full, it_values, it_rest = [], iter(values), iter(rest)
        for i in range(len(leaves.values)):
            full.append(next(it_values) if i in trainable else next(it_rest))
        params = jax.tree_util.tree_unflatten(leaves.treedef, full)
        xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
        return jb.select_output(prep.call(params, constants, xb), output).reshape(-1)

    first = jax.tree_util.tree_map(lambda a: a[0], jb.slice_inputs(x, 0, 1))
    seen = (id(output), _avals(first), _avals(values), _avals(dynamic))
    if prep.traced is not None and prep.traced[0] == seen:  # this call traced it already
        return prep.traced[1]
    key = None
    if prep.identity is not None and len(arrays) == len(extra):
        try:
            key = (id(prep.identity), prep.form, prep.batched, prep.train, leaves.treedef,
                   tuple(sorted(trainable)), _avals(values), _avals(dynamic), _avals(first),
                   hash(output), jax.config.jax_enable_x64)
        except TypeError:  # an unhashable output selector: no cache
            key = None
    def make() -> tuple[Any, Any, list[Any]]:
        closed = jax.make_jaxpr(single)(values, dynamic, first)
        return prep.identity, closed.jaxpr, list(closed.consts)

    if key is None:
        entry = make()
    else:
        entry = jb.cached(_TRACES, key, make)
        if entry[0] is not prep.identity:  # the id of a collected object, reused
            entry = _TRACES[key] = make()
    result = Traced(entry[1], entry[2], dynamic)
    prep.traced = (seen, result)
    return result


def _on_cpu(x: Any) -> bool:
    """Whether the inputs live on a CPU device."""
    jax = jb._jax()
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
                for s_len, d_in, d_out in (_leaf_shape(layout.sites[leaf], leaf in layout.bias)
                                           for leaf, r in layout.rules.items() if r == "pairs"))
    # the formed rows, the features, and about as much again for jacrev's temporaries
    return 2 * itemsize * (n_outputs * layout.row_width() + feats)


def _plan(prep: Any, leaves: Any, x: Any, request: KernelRequest, n_outputs: int,
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
    layout = choose(analysis, [int(v.size) for v in values], jb.batch_of(x), n_outputs, traced,
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


def structured_kernel(prep: Any, leaves: Any, x: Any, request: KernelRequest, n_outputs: int,
                      force: str | None = None) -> np.ndarray | None:
    """The kernel from per-layer rules, or ``None`` to use the Jacobian path.

    Args:
        prep: the prepared model (:class:`cvcore.backends.jax_backend.Prepared`), its
            parameters already in the request's dtype and on its device.
        leaves: its flattened parameters (:func:`cvcore.backends.jax_backend.flatten_params`).
        x: the inputs, as arrays on the device.
        request: the :class:`cvcore.protocols.KernelRequest`.
        n_outputs: outputs per sample ``O``.
        force: ``"pairs"`` or ``"jac"`` imposes that rule on every ruled leaf (tests).

    Returns:
        The kernel as a NumPy array (traced ``N × N`` divided by ``O``, or full
        ``N·O × N·O`` with row ``i·O + o``); ``None`` in train mode, when no leaf is
        measured by a rule, or when one sample's features exceed half the budget.
    """
    n = jb.batch_of(x)
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
    s_max = max(_leaf_shape(layout.sites[leaf])[0] for leaf in layout.rules)
    per_position = size * size * s_max * (1 if traced else n_outputs * n_outputs + 1) * itemsize
    chunk = max(1, (budget // 4) // max(1, per_position))
    features, pair = compiled(layout, fn.jaxpr, n_outputs, traced, chunk)
    blocks = [(a, min(a + size, n)) for a in range(0, n, size)]
    kernel = np.zeros((n * width, n * width), dtype=np.dtype(request.dtype))

    def block_features(a0: int, a1: int) -> Any:
        return features(values, fn.dynamic, fn.consts,
                        jb.pad_batch(jb.slice_inputs(x, a0, a1), size))

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
    jb.check_finite(kernel, n, width)
    return kernel


def structured_diagonal(prep: Any, leaves: Any, x: Any, request: KernelRequest,
                        n_outputs: int) -> np.ndarray | None:
    """``‖J_io‖²`` as ``(N, O)`` NumPy from the per-layer rules, or ``None`` to use the
    per-sample Jacobians (train mode, no rule worth using, features over the budget).

    A ``pairs`` leaf adds ``Σ_{s,t} (a_is·a_it)(g_ios·g_iot)`` (with one position,
    ``‖a_i‖² ‖g_io‖²``), the others the squared norms of their formed gradients; nothing
    of size ``N²`` is formed.
    """
    n = jb.batch_of(x)
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
        block = jb.pad_batch(jb.slice_inputs(x, a0, a1), size)
        out[a0:a1] = np.asarray(diag(features(values, fn.dynamic, fn.consts, block)))[:a1 - a0]
    return out
