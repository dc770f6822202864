"""Building blocks of the sequence and patch families (PyTorch, imported inside functions):
a pre-norm transformer block written out (no fused kernels, so every path of the NTK
engine can differentiate it), and the classification / language-model heads' losses."""

from __future__ import annotations

import math
from typing import Any

from cvcore.errors import InputError


def check_heads(width: int, heads: int) -> None:
    if width % heads:
        raise InputError(f"[model] heads: expected a divisor of width {width}, got {heads}")


def transformer_block(width: int, heads: int, causal: bool) -> Any:
    """x + Attention(LN(x)); x + MLP(LN(x)) with a 4× GELU MLP; causal masks the future."""
    import torch
    from torch import nn

    check_heads(width, heads)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                     nn.Linear(4 * width, width))

        def forward(self, x: Any) -> Any:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
            if causal:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            att = torch.softmax(scores, dim=-1) @ v
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.ln2(x))

    return Block()


def classification(x_tr: Any, y_tr: Any, x_te: Any, y_te: Any,
                   chunk: int = 512) -> tuple[Any, Any]:
    """(batch loss, evaluate) for cross-entropy on classes; eval in chunks."""
    import torch

    def loss(model: Any, x: Any, y: Any) -> Any:
        return torch.nn.functional.cross_entropy(model(x), y)

    def scores(model: Any, x: Any, y: Any) -> tuple[float, float]:
        total, right = 0.0, 0.0
        for s in range(0, len(x), chunk):
            out = model(x[s:s + chunk])
            total += float(torch.nn.functional.cross_entropy(out, y[s:s + chunk],
                                                             reduction="sum"))
            right += float((out.argmax(-1) == y[s:s + chunk]).sum())
        return total / len(x), right / len(x)

    def evaluate(model: Any) -> dict[str, float]:
        tr_loss, tr_acc = scores(model, x_tr, y_tr)
        te_loss, te_acc = scores(model, x_te, y_te)
        return {"train_loss": tr_loss, "test_loss": te_loss, "train_accuracy": tr_acc,
                "test_accuracy": te_acc}

    return loss, evaluate


def probe_sets(config: Any, x_tr: Any, x_te: Any) -> dict[str, Any]:
    """The first ``[probe] train`` training and ``[probe] test`` held-out samples."""
    probe: dict[str, Any] = {}
    if config.probe.train:
        probe["train"] = x_tr[:min(config.probe.train, len(x_tr))]
    if config.probe.test:
        probe["test"] = x_te[:min(config.probe.test, len(x_te))]
    return probe
