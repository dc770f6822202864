"""Weights stored ``(d_in, d_out)``: ``torch.addmm(b, x, W)`` and ``x @ W``, recorded as
dense uses for the structured NTK (:mod:`cvcore.backends.torch.capture`).

transformers' GPT-2 ``Conv1D`` computes ``torch.addmm(bias, x.view(-1, d_in), weight)``
and views the result back to ``(N, T, d_out)``: the recorded input has ``N·T`` rows, not
``N``. A 2-d input whose row count is a multiple ``k·n`` of the number of samples is read
sample-major, rows ``r·k … (r+1)·k − 1`` as sample r's positions: ``a`` is
``(n, k, d_in)`` and the output is viewed as ``(n, k, d_out)``, the view being what the
model gets back so that the output-gradients are taken on it. That reading is only a
candidate: :mod:`cvcore.backends.torch.rowcheck` compares those rows with a pass on half
the samples and checks backward locality, so a flatten that is not sample-major
(``x.transpose(0, 1).reshape(-1, d)``) fails and its parameters go to the Jacobian path.
The rule is the ``F.linear`` rule on ``Wᵀ``: the kernel does not depend on how a weight
is stored.
"""

from __future__ import annotations

from typing import Any

from .setup import bind_arguments

NOT_MINE = (False, None)


def rows_record(rec: Any, out: Any, x: Any, weight: Any, bias: Any = None,
                alpha: float = 1.0, beta: float = 1.0) -> Any:
    """Record ``out = beta·bias + alpha·(x @ weight)`` with ``weight`` ``(d_in, d_out)``.

    ``x`` is ``(n, ..., d_in)``, or 2-d ``(k·n, d_in)``: rows read sample-major, ``a``
    ``(n, k, d_in)`` and ``z`` the output viewed as ``(n, k, d_out)`` (the view is what the
    model gets back, so the output-gradients are taken there). ``a`` carries ``alpha``, and
    the bias column ``beta``. Returns the tensor to hand back to the model.
    """
    import torch

    n, d_in, d_out = rec.n, int(weight.shape[0]), int(weight.shape[1])
    w_name, b_name = rec.param(weight), rec.param(bias)
    a = x.detach().reshape(n, -1, d_in)
    z = out if x.dim() > 2 else out.reshape(n, -1, d_out)
    if alpha != 1.0:
        a = a * alpha
    also: tuple[str, ...] = ()
    if b_name is not None:  # fold the bias in: [W b] acting on [alpha·a beta]
        ones = a.new_full(a.shape[:-1] + (1,), float(beta))
        a, also = torch.cat([a, ones], dim=-1), (b_name,)
    assert w_name is not None
    rec.add(w_name, "dense", z, a, lambda g: g.reshape(g.shape[0], g.shape[1], -1, d_out),
            also=also)
    return z if x.dim() > 2 else z.reshape(out.shape)


def _rows_ok(rec: Any, x: Any, weight: Any) -> bool:
    """``x @ weight`` with a parameter ``(d_in, d_out)`` on data ``x`` whose rows are
    candidates for samples (leading size ``n``, or ``k·n`` for a 2-d ``x``)."""
    if rec.param(weight) is None or rec.param(x) is not None or weight.dim() != 2:
        return False
    if x.dim() < 2 or int(x.shape[-1]) != int(weight.shape[0]) or x.shape[0] == 0:
        return False
    rows = int(x.shape[0])
    return rows == rec.n if x.dim() > 2 else rows % rec.n == 0


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def addmm(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    """``torch.addmm(bias, x, W)``: GPT-2's ``Conv1D`` on its flattened ``(N·T, d_in)`` rows."""
    b = bind_arguments(args, kwargs, ("input", "mat1", "mat2"), {"beta": 1, "alpha": 1, "out": None})
    bias, x, weight = b["input"], b["mat1"], b["mat2"]
    if (b["out"] is not None or not _scalar(b["beta"]) or not _scalar(b["alpha"])
            or not _rows_ok(rec, x, weight) or x.dim() != 2):
        return NOT_MINE
    if rec.param(bias) is not None and tuple(bias.shape) != (int(weight.shape[1]),):
        return NOT_MINE  # a bias per row: no rule
    out = func(*args, **kwargs)
    return True, rows_record(rec, out, x, weight, bias, float(b["alpha"]), float(b["beta"]))


def matmul(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    """``x @ W`` / ``torch.matmul(x, W)`` with a parameter ``W`` ``(d_in, d_out)`` on the right."""
    b = bind_arguments(args, kwargs, ("input", "other"), {"out": None})
    if b["out"] is not None or not _rows_ok(rec, b["input"], b["other"]):
        return NOT_MINE
    out = func(*args, **kwargs)
    return True, rows_record(rec, out, b["input"], b["other"])
