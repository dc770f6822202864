"""The JAX structured path's Gram algebra: per-leaf rule choice and the kernel blocks.

Given the layer sites :mod:`cvcore.backends.jax.sites` finds in the jaxpr, :func:`choose`
decides per trainable leaf between the two exact rules (``pairs``, ``jac``) and direct
differentiation (a :class:`Layout`); :func:`make_pair` and :func:`make_diag` build the
jitted kernel block and diagonal of two blocks of features (a site's inputs ``a`` and
output-gradients ``g``, as :func:`cvcore.backends.jax.structured.make_features` records
them), the JAX counterpart of :mod:`cvcore.backends.torch.rules`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cvcore.blocking import dense_costs
from cvcore.imports import require
from cvcore.protocols import Implementation

from .sites import Analysis, Site


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


def leaf_shape(sites: list[Site], bias: bool = False) -> tuple[int, int, int]:
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
    differentiated directly. A grouped convolution has no ``pairs`` rule (``force``
    gives it ``jac``). Set on the CPU, where that measured 1.5–1.7× faster than
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
        s_len, d_in, d_out = leaf_shape(sites, bias is not None)
        size = sizes[leaf] + (0 if bias is None else sizes[bias])
        if diagonal:
            costs = _diagonal_costs(n_outputs, s_len, d_in, d_out, size)
            gram = costs["jac"]
        else:
            costs = dense_costs(n, n, n_outputs, s_len, d_in, d_out, traced)
            gram = float(n * n * n_outputs * size * (1 if traced else n_outputs))
        embedding = sites[0].kind == "embedding"
        if sites[0].groups > 1:  # grouped convolutions: the jac rule alone
            costs["pairs"] = math.inf
        if force is not None:
            rules[leaf] = "pairs" if embedding else "jac" if sites[0].groups > 1 else force
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
    jax = require("jax")
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
    jax = require("jax")
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
