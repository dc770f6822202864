"""Normalisation layers for the structured NTK (:mod:`cvcore.backends.torch.capture`):
``F.layer_norm``, ``F.rms_norm``, ``F.group_norm`` and ``F.batch_norm`` with running
statistics record their scale and shift as direct uses (``∂z/∂γ = x̂``, ``∂z/∂β = 1``,
summed over the positions each entry covers); batch norm with batch statistics marks the
capture as coupled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .setup import bind_arguments

_NOT_MINE = (False, None)


def _affine(rec: Any, out: Any, xhat: Any, weight: Any, bias: Any,
            channel_dim: int | None, trailing: int) -> None:
    """Record the scale and shift of a normalisation layer as direct features.

    ``channel_dim``: the per-sample dim of the channel (batch / group norm), or ``None``
    for layer/RMS norm whose parameters cover the last ``trailing`` dims.
    """
    def reducer(with_x: bool) -> Callable[[Any], Any]:
        def reduce(g: Any) -> Any:
            v = g * xhat.unsqueeze(1) if with_x else g
            n, n_out = v.shape[:2]
            if channel_dim is None:
                return v.reshape(n, n_out, -1, _numel(v.shape[v.dim() - trailing:])).sum(2)
            v = v.movedim(channel_dim + 2, 2)
            return v.reshape(n, n_out, v.shape[2], -1).sum(3)

        return reduce

    w_name, b_name = rec.param(weight), rec.param(bias)
    if w_name is not None:
        rec.add(w_name, "direct", out, None, reducer(True))
    if b_name is not None:
        rec.add(b_name, "direct", out, None, reducer(False))


def _numel(shape: Any) -> int:
    total = 1
    for s in shape:
        total *= int(s)
    return total


def layer_norm(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    import torch.nn.functional as F

    b = bind_arguments(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
              {"weight": None, "bias": None, "eps": 1e-5})
    if not rec.batched(b["input"]):
        return _NOT_MINE
    out = func(*args, **kwargs)
    shape = tuple(b["normalized_shape"])
    xhat = F.layer_norm(b["input"].detach(), shape, None, None, b["eps"])
    _affine(rec, out, xhat, b["weight"], b["bias"], None, len(shape))
    return True, out


def rms_norm(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    import torch.nn.functional as F

    b = bind_arguments(args, kwargs, ("input", "normalized_shape", "weight", "eps"),
              {"weight": None, "eps": None})
    if not rec.batched(b["input"]):
        return _NOT_MINE
    out = func(*args, **kwargs)
    shape = tuple(b["normalized_shape"])
    xhat = F.rms_norm(b["input"].detach(), shape, None, b["eps"])
    _affine(rec, out, xhat, b["weight"], None, None, len(shape))
    return True, out


def group_norm(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    import torch.nn.functional as F

    b = bind_arguments(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
              {"weight": None, "bias": None, "eps": 1e-5})
    if not rec.batched(b["input"]) or b["input"].dim() < 2:
        return _NOT_MINE
    out = func(*args, **kwargs)
    xhat = F.group_norm(b["input"].detach(), b["num_groups"], None, None, b["eps"])
    _affine(rec, out, xhat, b["weight"], b["bias"], 0, 0)
    return True, out


def batch_norm(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    b = bind_arguments(args, kwargs, ("input", "running_mean", "running_var", "weight", "bias",
                             "training", "momentum", "eps"),
              {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    x = b["input"]
    if b["training"] or b["running_mean"] is None or b["running_var"] is None:
        rec.capture.coupled = True  # batch statistics couple the samples
        return _NOT_MINE
    if not rec.batched(x) or x.dim() < 2:
        return _NOT_MINE
    out = func(*args, **kwargs)
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = b["running_mean"].detach().reshape(view), b["running_var"].detach().reshape(view)
    xhat = (x.detach() - mean) / (var + b["eps"]).sqrt()
    _affine(rec, out, xhat, b["weight"], b["bias"], 0, 0)
    return True, out
