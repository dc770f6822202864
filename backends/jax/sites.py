"""The JAX structured path's layer sites: which trainable leaves a jaxpr uses as a layer.

Every trainable leaf is followed through the one-sample jaxpr (:func:`analyse`): a leaf
whose every use is, after layout-only steps, the weight operand of a ``dot_general``,
a ``conv_general_dilated`` (grouped and depthwise ones included) or the table of an
embedding-style ``gather`` gets a :class:`Site` per use; the others are differentiated directly.
A bias added to a site's output is measured with the site's weight only when that output
is read by the bias add alone (:func:`consumers` counts every variable's readers), and no
equation with a complex operand or output gets a rule. :func:`activation` gives
a site's input for one sample, as :func:`cvcore.backends.jax.jaxpr.evaluate` records it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np

from .jaxpr import extend_core, inlined

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
        groups: a convolution's ``feature_group_count`` ``G``: input channels and output
            units split into ``G`` groups, group ``g``'s outputs seeing group ``g``'s
            inputs alone; ``d_in`` is then one group's input (``kh·kw·C_in/G``).
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
    groups: int = 1


def _site(eqn: Any, path: tuple[int, ...], kind: str, origin: Origin, side: int,
          signature: tuple[Any, ...], perm: tuple[int, ...], d_in: int, d_out: int,
          n_out_axes: int = 1, groups: int = 1) -> Site:
    out = eqn.outvars[0].aval
    shape = tuple(out.shape)
    return Site(path, kind, origin.leaf, side, (kind, origin.chain, *signature), shape,
                out.dtype, perm, math.prod(shape) // max(1, d_out), d_in, d_out, n_out_axes,
                groups)


@dataclasses.dataclass
class Analysis:
    """Sites of every ruled leaf, the leaves measured directly, and the biases folded into
    their weights; a leaf the output does not depend on is in none of them."""

    sites: list[Site]
    direct: set[int]
    bias: dict[int, int] = dataclasses.field(default_factory=dict)  # weight -> its bias


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
    if not np.issubdtype(np.dtype(aval_out.dtype), np.floating):  # integer or complex
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
    """A convolution's filter; with ``feature_group_count = G > 1`` (grouped, depthwise)
    the filter's input axis is one group's channels and its output axis ``G`` groups."""
    p = eqn.params
    if side != 1 or p["batch_group_count"] != 1:
        return None
    groups = int(p["feature_group_count"])
    dn = p["dimension_numbers"]
    rhs = tuple(eqn.invars[1].aval.shape)
    out = dn.out_spec
    d_out = rhs[dn.rhs_spec[0]]
    return _site(eqn, path, "conv", origin, 1,
                 (rhs, tuple(dn.rhs_spec), tuple(dn.lhs_spec), groups),
                 (out[0], *out[2:], out[1]), math.prod(rhs) // d_out, d_out, groups=groups)


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


def consumers(jaxpr: Any) -> collections.Counter[Any]:
    """How many times each variable of ``jaxpr`` is read: as an operand of its equations
    (a call such as ``pjit`` counts once per operand it is passed, whatever its body does
    with it) and as one of the jaxpr's outputs."""
    core = extend_core()
    count: collections.Counter[Any] = collections.Counter()
    for eqn in jaxpr.eqns:
        count.update(v for v in eqn.invars if not isinstance(v, core.Literal))
    count.update(v for v in jaxpr.outvars if not isinstance(v, core.Literal))
    return count


def _real(eqn: Any) -> bool:
    """Whether no operand or output of ``eqn`` is complex: the rules' Gram matrices
    (``a·a``, ``g·g``, no conjugates) hold for real layers only."""
    return not any(np.issubdtype(np.dtype(v.aval.dtype), np.complexfloating)
                   for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "dtype"))


def _walk(jaxpr: Any, origins: list[Origin | None], path: tuple[int, ...], w: _Walk
          ) -> list[Origin | None]:
    """Follow leaves through ``jaxpr``; returns the origins of its outputs.

    A bias is folded into a site only when the site's output is read by the bias add
    alone: the rule perturbs the site's output ``z``, so ``g = ∂f/∂z``, which is the
    bias's gradient ``∂f/∂(z + b)`` only when nothing else reads ``z`` (another equation,
    a nested call, or the jaxpr's outputs)."""
    core = extend_core()
    env: dict[Any, Origin] = {v: o for v, o in zip(jaxpr.invars, origins) if o is not None}
    reads = consumers(jaxpr)

    def origin_of(v: Any) -> Origin | None:
        return None if isinstance(v, core.Literal) else env.get(v)

    for k, eqn in enumerate(jaxpr.eqns):
        here = (*path, k)
        ins = [origin_of(v) for v in eqn.invars]
        found = [o for o in ins if o is not None]
        if not found:
            continue
        w.used.update(o.leaf for o in found)
        sub = inlined(eqn)
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
            if site is not None and reads[other] == 1 \
                    and _is_bias(eqn, side, found[0], site, w.sizes[found[0].leaf]):
                w.biases.append((found[0].leaf, site.path))
                continue
        rule = SITE_RULES.get(name) if _real(eqn) else None
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


def activation(site: Site, eqn: Any, invals: list[Any]) -> Any:
    """The site's input for one sample: ``(S, d_in)``, a grouped convolution's
    ``(S, G, d_in)`` (its patches hold each input channel's window in turn, so the
    channels of group ``g`` are the ``g``-th run of ``d_in``); an embedding's ids
    ``(S,)``, -1 where the gather reads nothing (out of range)."""
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
        shape = (site.s_len, site.d_in) if site.groups == 1 else (site.s_len, site.groups, site.d_in)
        return jnp.transpose(patches, site.perm).reshape(shape)
    ids = invals[1][..., 0].reshape(-1)
    vocab = site.signature[2][0]
    mode = getattr(eqn.params.get("mode"), "name", str(eqn.params.get("mode")))
    if "CLIP" in mode:
        return jnp.clip(ids, 0, vocab - 1)
    return jnp.where((ids >= 0) & (ids < vocab), ids, -1)
