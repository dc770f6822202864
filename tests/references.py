"""Independent references for kernel tests: explicit per-sample, per-output
``torch.autograd.grad`` loops (never cvcore's own engines)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def autograd_kernel(fn: Callable[[int], torch.Tensor], n: int,
                    params: Sequence[torch.Tensor]) -> np.ndarray:
    """Full kernel of ``fn(i) -> outputs of sample i``: one ``autograd.grad`` per sample
    and output, rows ``i·O + o``."""
    rows = []
    for i in range(n):
        out = fn(i).reshape(-1)
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params)]))
    j = torch.stack(rows)
    return (j @ j.T).numpy()


def full_reference(fn: Callable[[torch.Tensor], Any], x: torch.Tensor,
                   params: Sequence[torch.Tensor]) -> np.ndarray:
    """Full kernel of ``fn`` applied to each row of ``x`` alone."""
    return autograd_kernel(lambda i: fn(x[i:i + 1]), x.shape[0], params)
