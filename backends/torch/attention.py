"""``nn.MultiheadAttention`` as recorded ``F.linear`` calls, for the structured NTK.

``F.multi_head_attention_forward`` hides its projections from a torch function mode.
For the common case (self-attention with the packed input projection, no extra key /
value biases, no zero attention, no dropout) this module recomputes it from two
recorded linear layers and plain tensor algebra, so both projections get the dense
rule. Any other configuration is left to the Jacobian path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .setup import bind_arguments

if TYPE_CHECKING:
    import torch


_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
          "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
          "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
          "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
          "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
             "v_proj_weight": None, "static_k": None, "static_v": None,
             "average_attn_weights": True, "is_causal": False}


def _supported(b: dict[str, Any], n: int) -> bool:
    q = b["query"]
    return (q is b["key"] and q is b["value"] and q.dim() == 3 and int(q.shape[1]) == n
            and b["in_proj_weight"] is not None and not b["use_separate_proj_weight"]
            and b["bias_k"] is None and b["bias_v"] is None and not b["add_zero_attn"]
            and b["static_k"] is None and b["static_v"] is None
            and not (b["training"] and b["dropout_p"] > 0)
            and not (b["is_causal"] and b["attn_mask"] is None))


def _additive(mask: Any, dtype: torch.dtype) -> Any:
    import torch

    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _merged_mask(b: dict[str, Any], n: int, heads: int, length: int, dtype: torch.dtype) -> Any:
    mask = _additive(b["attn_mask"], dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(n, heads, length, -1)
    pad = _additive(b["key_padding_mask"], dtype)
    if pad is not None:
        pad = pad.reshape(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


def decomposed_mha(rec: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    """Recompute ``F.multi_head_attention_forward`` with recorded projections."""
    b = bind_arguments(args, kwargs, _NAMES, _DEFAULTS)
    if not _supported(b, rec.n):
        return False, None
    q = b["query"]
    length, n, embed = q.shape
    heads = int(b["num_heads"])
    hd = embed // heads
    x = q.transpose(0, 1)  # batch first for the recorded projection
    proj = rec.linear(x, b["in_proj_weight"], b["in_proj_bias"])
    qq, kk, vv = (t.reshape(n, length, heads, hd).transpose(1, 2) for t in proj.chunk(3, dim=-1))
    scores = (qq * (1.0 / hd) ** 0.5) @ kk.transpose(-2, -1)
    mask = _merged_mask(b, n, heads, length, scores.dtype)
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    mixed = (weights @ vv).transpose(1, 2).reshape(n, length, embed)
    out = rec.linear(mixed, b["out_proj_weight"], b["out_proj_bias"]).transpose(0, 1)
    if not b["need_weights"]:
        return True, (out, None)
    return True, (out, weights.mean(dim=1) if b["average_attn_weights"] else weights)
