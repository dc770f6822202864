"""The module the Hugging Face adapter hands to the backend: the model plus the output choice.

Output callables are called on one sample at a time, and a model's raw output does not say
where a sequence's padding is. :class:`LanguageHead` therefore takes the sample's whole
input (``input_ids``, ``attention_mask``, ...) and reduces the model's output with the
mask in its own ``forward``, so each sample's lengths are known where the choice is made.
Padded positions are masked in attention and never selected, so the kernel does not
depend on the pad token's id; causal LMs get position ids counted from the mask, so it
does not depend on the padding side either.

This module imports torch; :mod:`cvcore.adapters.huggingface` imports it only in
``adapt``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

#: The key of the extra input that names a sample's position (``output="positions"``).
POSITION_KEY = "cvcore_position"


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padded position (left or right padding)."""
    length = mask.shape[-1]
    return (length - 1) - torch.flip(mask, dims=(-1,)).to(torch.int64).argmax(dim=-1)


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's first non-padded position."""
    return mask.to(torch.int64).argmax(dim=-1)


def at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b]]`` for ``values`` of shape ``(B, L, ...)``."""
    shape = (values.shape[0], 1) + tuple(values.shape[2:])
    idx = index.reshape((-1, 1) + (1,) * (values.dim() - 2)).expand(shape)
    return values.gather(1, idx).squeeze(1)


def next_token_logprob(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log p(x_T | x_<T)`` of each sequence's last non-padded token: shape ``(B, 1)``."""
    last = last_index(mask)
    logp = torch.log_softmax(at(logits, last - 1), dim=-1)
    return logp.gather(1, at(ids.unsqueeze(-1), last)).reshape(-1, 1)


def sequence_logprob(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t log p(x_{t+1} | x_≤t)`` over the non-padded pairs of positions: ``(B, 1)``."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    observed = logp.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = (mask[:, 1:] * mask[:, :-1]).to(torch.bool)
    return torch.where(valid, observed, torch.zeros_like(observed)).sum(dim=1, keepdim=True)


class LanguageHead(torch.nn.Module):
    """A Hugging Face model whose output is one of the adapter's choices.

    Args:
        model: the ``transformers.PreTrainedModel``.
        kind: one of :data:`cvcore.adapters.huggingface.OUTPUTS`.
        causal: whether the model is a causal LM (position ids are then counted from the
            attention mask).
        custom: for ``kind="custom"``, a callable ``f(raw, inputs)`` on the model's raw
            output and the sample's inputs (with ``attention_mask``).
        description: the text echoed in results.
    """

    #: per-layer rows name the Hugging Face model's modules (backends/torch/layers.py)
    cvcore_wraps = "model"

    def __init__(self, model: Any, kind: str, *, causal: bool, description: str,
                 custom: Callable[[Any, dict[str, Any]], Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.causal = causal
        self.custom = custom
        self.cvcore_output = description
        params = inspect.signature(model.forward).parameters
        self.counts_positions = causal and "position_ids" in params
        #: Whether the model can run its LM head on chosen positions only (``logits_to_keep``).
        self.keeps_logits = "logits_to_keep" in params

    def forward(self, *args: Any, **inputs: Any) -> torch.Tensor:
        if args:  # an image or audio model called on one array: no mask, no positions
            raw = self.model(*args, **inputs)
            if self.kind == "custom":
                assert self.custom is not None
                return self.custom(raw, {"args": args, **inputs})  # type: ignore[no-any-return]
            if self.kind == "cls":
                return raw.last_hidden_state[:, 0]  # type: ignore[no-any-return]
            return raw.pooler_output if self.kind == "pooled" else raw.logits  # type: ignore[no-any-return]
        position = inputs.pop(POSITION_KEY, None)
        ids = inputs.get("input_ids")
        mask = inputs.get("attention_mask")
        if ids is not None and mask is None:
            mask = torch.ones_like(ids)
            inputs["attention_mask"] = mask
        if self.counts_positions and mask is not None and "position_ids" not in inputs:
            inputs["position_ids"] = (mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
        kind = self.kind
        keep = None  # the one position whose logits are needed (the LM head runs there only)
        if self.keeps_logits and ids is not None and mask is not None:
            if kind == "last":
                keep = last_index(mask)
            elif kind == "positions" and position is not None:
                keep = position.reshape(-1)
            elif kind == "next-token":
                keep = last_index(mask) - 1
        if keep is not None:
            logits = self.model(**inputs, logits_to_keep=keep.reshape(-1, 1)).logits[:, 0]
            if kind != "next-token":
                return logits
            assert ids is not None and mask is not None
            target = at(ids.unsqueeze(-1), last_index(mask))
            return torch.log_softmax(logits, dim=-1).gather(1, target).reshape(-1, 1)
        raw = self.model(**inputs)
        if kind == "custom":
            assert self.custom is not None
            return self.custom(raw, inputs)  # type: ignore[no-any-return]
        if kind == "logits":
            return raw.logits  # type: ignore[no-any-return]
        if kind == "pooled":
            return raw.pooler_output  # type: ignore[no-any-return]
        if kind == "cls":
            hidden = raw.last_hidden_state
            return hidden[:, 0] if mask is None else at(hidden, first_index(mask))
        hidden = raw.logits if getattr(raw, "logits", None) is not None else raw.last_hidden_state
        assert mask is not None and ids is not None
        if kind == "last":
            return at(hidden, last_index(mask))
        if kind == "positions":
            assert position is not None
            return at(hidden, position.reshape(-1))
        if kind == "next-token":
            return next_token_logprob(raw.logits, ids, mask)
        if kind == "sequence":
            return sequence_logprob(raw.logits, ids, mask)
        raise AssertionError(kind)
