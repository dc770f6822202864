"""Parameters read through rearrangements and added as biases, for the structured NTK
(:mod:`cvcore.backends.torch.capture`).

Keras 3 on torch hands its weights to torch in its own layouts: a ``Conv2D`` kernel
``(kh, kw, C_in, C_out)`` is ``torch.permute`` d to ``(C_out, C_in, kh, kw)`` before
``F.conv2d``, a ``DepthwiseConv2D`` kernel reshaped and permuted, a bias reshaped to
broadcast and then ``torch.add`` ed to the layer's output, every weight passed through
``Tensor.to(device)`` (which returns the tensor itself when it is already there).

* :func:`view_rules`: a permutation, reshape, transpose, (un)squeeze, flatten, contiguous copy
  or same-dtype ``to`` of a parameter (or of such a view) is recorded as a *view* of the
  parameter: the rules then see the view as the parameter, with the chain of steps that
  made it. The view's entries are the parameter's entries in another order, so the
  Jacobian with respect to it is the parameter's with permuted columns and ``J Jᵀ`` is
  the same. A parameter that rules read through two different chains (``x @ W`` and
  ``x @ W.permute(1, 0)``) has no rule (``Capture.views``); any other call on a view
  taints the parameter, as a call on the parameter does.
* :func:`add`: ``x + b`` / ``torch.add(x, b)`` / ``x.add_(b)`` with a parameter (or a
  view of one) ``b`` broadcast over a batched ``x`` without touching its sample axis: a
  ``direct`` use, the output-gradient summed over the broadcast axes.
* :func:`mul`: ``x * b`` likewise (the output-gradient times ``x``), and ``c * p`` with a
  constant ``c`` and a parameter view ``p`` of ``c * p``'s shape: a *scaled* view, whose
  factor ``c`` the direct uses apply (Keras' batch normalization on torch computes
  ``x.subtract(mean).mul_(variance.add(eps).rsqrt_().mul(gamma)).add_(beta)``). Only
  these rules apply factors: a scaled view given to any other rule taints its parameter.

A use whose output is changed in place afterwards loses its rule (the version check of
:func:`cvcore.backends.torch.capture.forward_capture`), so ``x.mul_(s).add_(b)`` keeps the
``mul_`` 's use only because an in-place add of a bias leaves the gradient at its
output unchanged (:func:`add` carries such uses over).
"""

from __future__ import annotations

from typing import Any

NOT_MINE = (False, None)


def _view(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    import torch

    src = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(src, torch.Tensor) or id(src) not in rec.ids:
        return NOT_MINE
    rest = [leaf for leaf in torch.utils._pytree.tree_leaves((args[1:], kwargs))
            if isinstance(leaf, torch.Tensor)]
    if any(id(t) in rec.ids for t in rest):
        return NOT_MINE
    out = func(*args, **kwargs)
    if out is src:  # ``to`` / ``contiguous`` with nothing to do
        return True, out
    if (not isinstance(out, torch.Tensor) or out.dtype != src.dtype
            or out.numel() != src.numel()):
        rec.capture.tainted.add(rec.ids[id(src)])
        return True, out
    settings = tuple(repr(v) for v in (*args[1:], *sorted(kwargs.items())))
    factor = rec.factors.get(id(src))
    if factor is not None:  # the factor follows the view's rearrangement
        factor = func(factor, *args[1:], **kwargs)
    rec.alias(out, src, (getattr(func, "__name__", ""), settings, tuple(src.shape),
                         tuple(out.shape)), factor)
    return True, out


def view_rules() -> dict[Any, Any]:
    """The rearrangements recorded as views, ``func -> rule``."""
    import torch

    funcs = [torch.permute, torch.Tensor.permute, torch.reshape, torch.Tensor.reshape,
             torch.Tensor.view, torch.transpose, torch.Tensor.transpose, torch.squeeze,
             torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze, torch.flatten,
             torch.Tensor.flatten, torch.Tensor.contiguous, torch.Tensor.to]
    return {f: _view for f in funcs}


def _broadcast_bias(rec: Any, x: Any, b: Any) -> bool:
    """Whether ``b`` (a parameter view) broadcasts over the batched ``x`` without
    reaching its sample axis."""
    if id(b) not in rec.ids or not rec.batched(x) or b.dim() > x.dim():
        return False
    return b.dim() < x.dim() or int(b.shape[0]) == 1


def _operands(rec: Any, args: Any, kwargs: Any, inplace: bool) -> tuple[Any, Any] | None:
    """``(x, b)`` of a binary op with the parameter view ``b`` broadcast over ``x``."""
    import torch

    if len(args) < 2 or kwargs.get("alpha", 1) != 1 or kwargs.get("out") is not None:
        return None
    first, second = args[0], args[1]
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return None
    x, b = (first, second) if id(second) in rec.ids else (second, first)
    if inplace and x is not first:  # the parameter itself changed in place
        return None
    return (x, b) if _broadcast_bias(rec, x, b) else None


def _direct(rec: Any, out: Any, x: Any, b: Any, times: Any = None) -> None:
    """Record ``out = x ∘ b`` (``∘`` broadcast over ``x``'s trailing axes) as a direct use
    of ``b``'s parameter: ``∂f/∂b = Σ_broadcast g · times`` (``times``: ``x`` for a
    product, nothing for a sum), then the view's factor."""
    name = rec.param(b)
    factor = rec.factors.get(id(b))
    tail = [int(s) for s in out.shape[1:]]
    shape = [int(s) for s in b.shape][1 if b.dim() == x.dim() else 0:]
    shape = [1] * (len(tail) - len(shape)) + shape
    dims = [k + 2 for k, (p, o) in enumerate(zip(shape, tail)) if p == 1 and o != 1]
    scale = None if factor is None else factor.detach().reshape(1, 1, -1)

    def reduce(g: Any) -> Any:
        if times is not None:
            g = g * times.unsqueeze(1)
        if dims:
            g = g.sum(dim=dims, keepdim=True)
        g = g.reshape(g.shape[0], g.shape[1], -1)
        return g if scale is None else g * scale

    rec.add(name, "direct", out, None, reduce)


def _inplace(func: Any) -> bool:
    return getattr(func, "__name__", "").endswith("_") and not getattr(
        func, "__name__", "").startswith("__") or getattr(func, "__name__", "") in (
        "__iadd__", "__imul__")


def add(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    """``x + b`` with a parameter ``b`` broadcast over the batched ``x`` (see the module doc)."""
    pair = _operands(rec, args, kwargs, _inplace(func))
    if pair is None:
        return NOT_MINE
    x, b = pair
    shape, version = tuple(x.shape), int(x._version)
    out = func(*args, **kwargs)
    if tuple(out.shape) != shape or out.dtype != b.dtype:
        rec.capture.tainted.add(rec.ids[id(b)])  # b broadcast over the samples too
        return True, out
    if out is x:
        # x.add_(b) leaves ∂f/∂x as it was (∂(x + b)/∂x = 1): uses recorded on x keep
        # their output-gradient, so the in-place add does not cost them their rule
        for u in rec.capture.uses:
            if u.z is x and u.version == version:
                u.version = int(x._version)
    _direct(rec, out, x, b)
    return True, out


def mul(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    """``x * b`` with a parameter view ``b`` broadcast over the batched ``x`` (a direct
    use), or ``c * p`` with a constant ``c`` that broadcasts into a parameter view ``p``
    without the samples' axis (a scaled view of ``p``, batch normalization's
    ``rsqrt(var + eps) * gamma``)."""

    inplace = _inplace(func)
    scaled = None if inplace else _scaled_view(rec, func, args, kwargs)
    if scaled is not None:
        return True, scaled
    pair = _operands(rec, args, kwargs, inplace)
    if pair is None:
        return NOT_MINE
    x, b = pair
    before = x.detach().clone()
    shape = tuple(x.shape)
    out = func(*args, **kwargs)
    if tuple(out.shape) != shape or out.dtype != b.dtype:
        rec.capture.tainted.add(rec.ids[id(b)])
        return True, out
    _direct(rec, out, before, b, before)
    return True, out


def _scaled_view(rec: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """``c * p`` as a scaled view of the parameter view ``p`` (``None`` if it is not one):
    ``c`` a number or a tensor outside the autograd graph (so no activation, which
    depends on the parameters) that broadcasts into ``p``'s shape. Tried before the direct
    use, since with one sample a constant ``(1, C)`` looks batched."""
    import torch

    if len(args) < 2 or kwargs:
        return None
    first, second = args[0], args[1]
    p, c = (first, second) if id(first) in rec.ids else (second, first)
    if not isinstance(p, torch.Tensor) or id(p) not in rec.ids or id(c) in rec.ids:
        return None
    if isinstance(c, torch.Tensor):
        if c.requires_grad or c.dim() > p.dim():
            return None
        if any(int(a) != 1 and int(a) != int(q) for a, q in zip(reversed(c.shape),
                                                                  reversed(p.shape))):
            return None
    elif not isinstance(c, (int, float)) or isinstance(c, bool):
        return None
    out = func(*args, **kwargs)
    factor = torch.ones_like(out).mul(c.detach() if isinstance(c, torch.Tensor) else c)
    old = rec.factors.get(id(p))
    rec.alias(out, p, ("scale", tuple(p.shape)), factor if old is None else factor * old)
    return out


#: Rules that apply a scaled view's factor; any other rule taints a scaled view it is given.
SCALED_OK = frozenset({_view, add, mul})
