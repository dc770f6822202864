"""Per-layer kernel identities for the structured PyTorch NTK (the math, no capture).

Every recognised layer use is reduced to one of three *features* per parameter block:

``direct``
    per-sample gradients ``g`` of shape ``(n, O, P)`` (norm scales and shifts, biases):
    cheap because ``P`` is small; the kernel is ``g gᵀ``.
``dense``
    a weight ``W`` (``d_out × d_in``) applied at ``S`` positions per sample (a linear layer
    on tokens, a convolution after unfolding): inputs ``a`` ``(n, S, d_in)`` and
    output-gradients ``g`` ``(n, O, S, d_out)``. Two exact rules:

    * ``jac``: form the per-sample gradient ``Σ_s g_s ⊗ a_s`` by one batched product and
      take its Gram matrix (costs ``n·O·S·d_in·d_out`` plus the Gram);
    * ``pairs``: ``K = Σ_{s,t} (a_is·a_jt)(g_ios·g_jpt)``, two Gram matrices over
      positions and a contraction, never forming a gradient of size ``d_in·d_out``
      (with ``S = 1`` this is ``(A Aᵀ) ⊙ (G Gᵀ)``).
``embedding``
    like ``dense`` with one-hot inputs: ``a_is·a_jt`` is ``[idx_is = idx_jt]``.
``tied``
    one weight ``W`` (``V × d``) read by ``F.embedding`` and applied by ``F.linear`` (a
    language model's tied input and output embeddings): the gradient is the sum of an
    embedding part ``Σ_s e_{idx_s} ⊗ g^e_s`` and a dense part ``Σ_t g^l_t ⊗ h_t``, so the
    kernel is the two parts' kernels plus their cross terms
    ``⟨e_{idx_is} ⊗ g^e_is, g^l_jt ⊗ h_jt⟩ = g^l_jt[idx_is] · (g^e_is · h_jt)``.

Functions here take torch tensors and return torch tensors; ``torch`` is only touched
through the tensors' own methods, so this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cvcore.blocking import dense_costs


@dataclass
class Feature:
    """What one parameter block contributes, for one block of samples.

    Attributes:
        kind: ``"direct"``, ``"dense"``, ``"embedding"`` or ``"tied"``.
        g: direct: ``(n, O, P)``; dense/embedding: ``(n, O, S, d_out)``; tied: the dense
            part's.
        a: dense: ``(n, S, d_in)``; embedding: token ids ``(n, S)``, ``-1`` where the
            gradient is zero (padding); ``None`` for direct; tied: the dense part's.
        tied: for ``"tied"``, the embedding part (an ``"embedding"`` feature).
    """

    kind: str
    g: Any
    a: Any = None
    tied: Feature | None = None

    @property
    def n(self) -> int:
        return int(self.g.shape[0])


# --------------------------------------------------------------------------- costs
def choose_dense(f1: Feature, f2: Feature, traced: bool, embedding: bool = False) -> str:
    """The cheaper exact rule for a dense (or embedding) feature pair."""
    n1, n_out, s, d_out = f1.g.shape
    d_in = 1 if embedding else int(f1.a.shape[2])
    costs = dense_costs(n1, int(f2.g.shape[0]), n_out, s, d_in, d_out, traced)
    if embedding:
        # one-hot over the tokens present; the pair rule only compares ids
        used = min(n1 * s + int(f2.g.shape[0]) * s, 1 << 30)
        costs = dense_costs(n1, int(f2.g.shape[0]), n_out, s, used, d_out, traced)
        costs["pairs"] = float((n1 * s) * (int(f2.g.shape[0]) * s)
                               * (1 + (n_out if traced else n_out * n_out) * d_out))
    return min(costs, key=lambda k: costs[k])


# --------------------------------------------------------------------------- grams
def sym_gram(x: Any, leaf: int = 384, min_width: int = 512) -> Any:
    """``x xᵀ`` computing only the blocks on and above the diagonal (about half the work).

    Only for rows of at least ``min_width`` entries: with fewer, writing the ``n × n``
    result costs as much as the product, and one matrix product is faster (measured on
    2 CPU cores, 1 thread: 10240 × 256 rows 1.6 s halved against 0.9 s whole; 2560 ×
    16384 rows 1.2 s against 2.2 s).

    >>> import torch
    >>> x = torch.randn(1000, 7, dtype=torch.float64)
    >>> bool(torch.allclose(sym_gram(x, leaf=100, min_width=1), x @ x.T))
    True
    """
    import torch

    n = x.shape[0]
    if n <= leaf or x.shape[1] < min_width:
        return x @ x.T
    h = n // 2
    top, bottom = x[:h], x[h:]
    off = top @ bottom.T
    return torch.cat([torch.cat([sym_gram(top, leaf, min_width), off], dim=1),
                      torch.cat([off.T, sym_gram(bottom, leaf, min_width)], dim=1)], dim=0)


def _rows_gram(r1: Any, r2: Any) -> Any:
    return sym_gram(r1) if r1 is r2 else r1 @ r2.T


def direct_gram(g1: Any, g2: Any, traced: bool) -> Any:
    """``g gᵀ`` for per-sample gradients ``(n, O, P)``: traced ``(n1, n2)`` (÷O), full ``(n1·O, n2·O)``."""
    n1, n_out, p = g1.shape
    same = g1 is g2
    r1 = g1.reshape(n1, -1) if traced else g1.reshape(-1, p)
    r2 = r1 if same else (g2.reshape(g2.shape[0], -1) if traced else g2.reshape(-1, p))
    gram = _rows_gram(r1, r2)
    return gram / n_out if traced else gram


def _chunk(total: int, per_item: int, budget: int) -> int:
    return max(1, min(total, budget // max(1, per_item)))


def dense_jacobian(a: Any, g: Any, rows: slice) -> Any:
    """Per-sample gradients ``Σ_s g_s ⊗ a_s`` restricted to output rows ``rows``: ``(n, O, r·d_in)``."""
    n, n_out = g.shape[:2]
    return (g[..., rows].transpose(2, 3) @ a.unsqueeze(1)).reshape(n, n_out, -1)


def _onehot_pair(f1: Feature, f2: Feature) -> tuple[Any, Any]:
    """One-hot inputs over the tokens present in either block (zeros for padding)."""
    import torch

    ids = torch.cat([f1.a.reshape(-1), f2.a.reshape(-1)])
    vocab = torch.unique(ids[ids >= 0])
    dtype = f1.g.dtype

    def onehot(idx: Any) -> Any:
        pos = torch.searchsorted(vocab, idx.clamp(min=0))
        hot = torch.zeros(*idx.shape, max(1, vocab.numel()), dtype=dtype, device=idx.device)
        hot.scatter_(-1, pos.clamp(max=max(0, vocab.numel() - 1)).unsqueeze(-1), 1.0)
        return hot * (idx >= 0).unsqueeze(-1).to(dtype)

    return onehot(f1.a), onehot(f2.a)


def dense_gram(f1: Feature, f2: Feature, traced: bool, budget: int) -> Any:
    """The kernel block of a dense or embedding feature pair, by the cheaper exact rule."""
    embedding = f1.kind == "embedding"
    rule = choose_dense(f1, f2, traced, embedding)
    if rule == "jac":
        a1, a2 = _onehot_pair(f1, f2) if embedding else (f1.a, f2.a)
        if f1 is f2:
            a2 = a1
        return _gram_by_jacobian(a1, f1.g, a2, f2.g, traced, budget)
    return _gram_by_pairs(f1, f2, traced, budget)


def _gram_by_jacobian(a1: Any, g1: Any, a2: Any, g2: Any, traced: bool, budget: int) -> Any:
    n1, n_out, _, d_out = g1.shape
    n2, d_in = g2.shape[0], a1.shape[2]
    per_row = (n1 + n2) * n_out * d_in * g1.element_size()
    step = _chunk(d_out, per_row, budget // 2)
    out = None
    for r0 in range(0, d_out, step):
        rows = slice(r0, min(r0 + step, d_out))
        j1 = dense_jacobian(a1, g1, rows)
        j2 = j1 if (a1 is a2 and g1 is g2) else dense_jacobian(a2, g2, rows)
        block = direct_gram(j1, j2, traced)
        out = block if out is None else out + block
    return out


def _a_pairs(f1: Feature, f2: Feature, s_rows: slice) -> Any:
    """``a_is · a_jt`` for positions ``s`` in ``s_rows`` of block 1: ``(n1, s, n2, S)``."""
    n1, n2 = f1.g.shape[0], f2.g.shape[0]
    if f1.kind == "embedding":
        i1 = f1.a[:, s_rows]
        same = (i1.reshape(-1, 1) == f2.a.reshape(1, -1)) & (i1.reshape(-1, 1) >= 0)
        return same.to(f1.g.dtype).reshape(n1, i1.shape[1], n2, -1)
    a1 = f1.a[:, s_rows]
    return (a1.reshape(-1, a1.shape[2]) @ f2.a.reshape(-1, f2.a.shape[2]).T).reshape(
        n1, a1.shape[1], n2, -1)


def _gram_single_position(f1: Feature, f2: Feature, traced: bool) -> Any:
    """``(A Aᵀ) ⊙ (G Gᵀ)`` for one position per sample (a dense layer on vectors)."""
    n1, n_out, _, d_out = f1.g.shape
    n2 = f2.g.shape[0]
    aa = _a_pairs(f1, f2, slice(None)).reshape(n1, n2)
    same = f1 is f2
    if traced:
        r1 = f1.g.reshape(n1, -1)
        gg = _rows_gram(r1, r1 if same else f2.g.reshape(n2, -1))
        return gg.mul_(aa).div_(n_out)
    r1 = f1.g.reshape(n1 * n_out, d_out)
    gg = _rows_gram(r1, r1 if same else f2.g.reshape(n2 * n_out, d_out))
    gg.view(n1, n_out, n2, n_out).mul_(aa.view(n1, 1, n2, 1))
    return gg


def _gram_by_pairs(f1: Feature, f2: Feature, traced: bool, budget: int) -> Any:
    n1, n_out, s_len, d_out = f1.g.shape
    n2 = f2.g.shape[0]
    if s_len == 1 and f2.g.shape[2] == 1:
        return _gram_single_position(f1, f2, traced)
    width = 1 if traced else n_out * n_out
    per_position = n1 * n2 * s_len * (1 + width) * f1.g.element_size()
    step = _chunk(s_len, per_position, budget // 2)
    if traced:
        g2 = f2.g.permute(0, 2, 1, 3).reshape(n2 * s_len, n_out * d_out)
    else:
        g2 = f2.g.reshape(n2 * n_out * s_len, d_out)
    out = None
    for s0 in range(0, s_len, step):
        rows = slice(s0, min(s0 + step, s_len))
        aa = _a_pairs(f1, f2, rows)
        g1 = f1.g[:, :, rows]
        sc = g1.shape[2]
        if traced:
            gg = (g1.permute(0, 2, 1, 3).reshape(n1 * sc, -1) @ g2.T).reshape(n1, sc, n2, s_len)
            block = (aa * gg).sum(dim=(1, 3)) / n_out
        else:
            gg = (g1.reshape(-1, d_out) @ g2.T).reshape(n1, n_out, sc, n2, n_out, s_len)
            block = (gg * aa[:, None, :, :, None, :]).sum(dim=(2, 5)).reshape(n1 * n_out, n2 * n_out)
        out = block if out is None else out + block
    return out


def feature_gram(f1: Feature, f2: Feature, traced: bool, budget: int) -> Any:
    """The kernel block between two sample blocks for one parameter block."""
    if f1.kind == "direct":
        return direct_gram(f1.g, f2.g, traced)
    if f1.kind == "tied":
        return _tied_gram(f1, f2, traced, budget)
    return dense_gram(f1, f2, traced, budget)


# --------------------------------------------------------------------------- tied
def dense_part(f: Feature) -> Feature:
    """The dense (``F.linear``) part of a tied feature."""
    return Feature("dense", f.g, f.a)


def tie(old: Feature, new: Feature, merge: Any) -> Feature:
    """Features of one weight from embedding and dense uses, combined (``merge`` joins two
    features of the same kind); a ``"tied"`` feature once both kinds are present."""
    by_kind: dict[str, Feature] = {}
    for f in (old, new):
        for part in ((dense_part(f), f.tied) if f.kind == "tied" else (f,)):
            assert part is not None
            have = by_kind.get(part.kind)
            by_kind[part.kind] = part if have is None else merge(have, part)
    dense, emb = by_kind.get("dense"), by_kind.get("embedding")
    if dense is None or emb is None:
        return dense or emb  # type: ignore[return-value]
    return Feature("tied", dense.g, dense.a, tied=emb)


def _tied_parts(f1: Feature, f2: Feature) -> tuple[Feature, Feature, Feature, Feature]:
    d1 = dense_part(f1)
    d2 = d1 if f1 is f2 else dense_part(f2)
    assert f1.tied is not None and f2.tied is not None
    return d1, d2, f1.tied, f2.tied


def _tied_gram(f1: Feature, f2: Feature, traced: bool, budget: int) -> Any:
    d1, d2, e1, e2 = _tied_parts(f1, f2)
    out = dense_gram(d1, d2, traced, budget) + dense_gram(e1, e2, traced, budget)
    return out + _tied_cross(e1, d2, traced) + _tied_cross(e2, d1, traced).T


def _selected(e: Feature, d: Feature, rows: slice) -> Any:
    """``g^l_jt[idx_is]`` for samples ``j`` in ``rows`` of ``d``: ``(j, O, T, n_e, S)``,
    zero at padding."""
    ids = e.a
    sel = d.g[rows][..., ids.clamp(min=0)]
    return sel * (ids >= 0).to(sel.dtype)


def _tied_cross(e: Feature, d: Feature, traced: bool) -> Any:
    """``⟨E_io, D_jo'⟩``: traced ``(n_e, n_d)`` (÷O), full ``(n_e·O, n_d·O)``."""
    import torch

    n1, n_out, s_len = e.g.shape[:3]
    n2, _, t_len = d.g.shape[:3]
    step = _chunk(n2, n_out * t_len * n1 * s_len, 1 << 24)  # two (j, O, T, n1, S) temporaries
    blocks = []
    for j0 in range(0, n2, step):
        rows = slice(j0, min(j0 + step, n2))
        gh = torch.einsum("iosd,jtd->iosjt", e.g, d.a[rows])
        sel = _selected(e, d, rows)
        if traced:
            blocks.append(torch.einsum("iosjt,jotis->ij", gh, sel) / n_out)
        else:
            blocks.append(torch.einsum("iosjt,jptis->iojp", gh, sel).reshape(n1 * n_out, -1))
    return torch.cat(blocks, dim=1)


def _tied_cross_diagonal(f: Feature) -> Any:
    """``⟨E_io, D_io⟩`` for every sample and output: ``(n, O)``."""
    import torch

    assert f.tied is not None
    ids, ge = f.tied.a, f.tied.g
    n, n_out, t_len = f.g.shape[:3]
    gh = torch.einsum("iosd,itd->iost", ge, f.a)
    idx = ids.clamp(min=0)[:, None, None, :].expand(n, n_out, t_len, ids.shape[1])
    sel = f.g.gather(3, idx) * (ids >= 0).to(f.g.dtype)[:, None, None, :]
    return torch.einsum("iost,iots->io", gh, sel)


# --------------------------------------------------------------------------- diagonals
def feature_diagonal(f: Feature, budget: int) -> Any:
    """``‖J_io‖²`` restricted to this parameter block: ``(n, O)``."""
    if f.kind == "direct":
        return (f.g * f.g).sum(-1)
    if f.kind == "tied":
        assert f.tied is not None
        return (feature_diagonal(dense_part(f), budget) + feature_diagonal(f.tied, budget)
                + 2 * _tied_cross_diagonal(f))
    n, n_out, s_len, d_out = f.g.shape
    d_in = 1 if f.kind == "embedding" else int(f.a.shape[2])
    pairs_cost = n * s_len * s_len * (d_in + n_out * d_out)
    jac_cost = n * n_out * s_len * d_in * d_out
    if f.kind == "dense" and (jac_cost <= pairs_cost or s_len == 1):
        if s_len == 1:
            return (f.a[:, 0] ** 2).sum(-1)[:, None] * (f.g[:, :, 0] ** 2).sum(-1)
        per_sample = n_out * d_in * d_out * f.g.element_size()
        step = _chunk(n, per_sample, budget // 2)
        parts = [(dense_jacobian(f.a[i:i + step], f.g[i:i + step], slice(None)) ** 2).sum(-1)
                 for i in range(0, n, step)]
        import torch

        return torch.cat(parts)
    if f.kind == "embedding":
        aa = ((f.a[:, :, None] == f.a[:, None, :]) & (f.a[:, :, None] >= 0)).to(f.g.dtype)
    else:
        aa = f.a @ f.a.transpose(1, 2)
    gg = f.g @ f.g.transpose(2, 3)
    return (gg * aa[:, None]).sum(dim=(2, 3))
