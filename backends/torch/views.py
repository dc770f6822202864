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
* :func:`add`: ``x + b`` / ``torch.add(x, b)`` with a parameter (or a view of one) ``b``
  broadcast over a batched ``x`` without touching its sample axis: a ``direct`` use,
  the output-gradient summed over the broadcast axes.
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
    rec.alias(out, src, (getattr(func, "__name__", ""), settings, tuple(src.shape),
                         tuple(out.shape)))
    return True, out


def view_rules() -> dict[Any, Any]:
    """The rearrangements recorded as views, ``func -> rule``."""
    import torch

    funcs = [torch.permute, torch.Tensor.permute, torch.reshape, torch.Tensor.reshape,
             torch.Tensor.view, torch.transpose, torch.Tensor.transpose, torch.squeeze,
             torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze, torch.flatten,
             torch.Tensor.flatten, torch.Tensor.contiguous, torch.Tensor.to]
    return {f: _view for f in funcs}


def add(rec: Any, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    """``x + b`` with a parameter ``b`` broadcast over the batched ``x`` (see the module doc)."""
    import torch

    if len(args) < 2 or kwargs.get("alpha", 1) != 1 or kwargs.get("out") is not None:
        return NOT_MINE
    first, second = args[0], args[1]
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return NOT_MINE
    x, b = (first, second) if id(second) in rec.ids else (second, first)
    if id(b) not in rec.ids or not rec.batched(x) or b.dim() > x.dim():
        return NOT_MINE
    if b.dim() == x.dim() and int(b.shape[0]) != 1:
        return NOT_MINE
    out = func(*args, **kwargs)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != b.dtype:
        rec.capture.tainted.add(rec.ids[id(b)])  # b broadcast over the samples too
        return True, out
    name = rec.param(b)
    tail = [int(s) for s in out.shape[1:]]
    shape = [int(s) for s in b.shape][1 if b.dim() == x.dim() else 0:]
    shape = [1] * (len(tail) - len(shape)) + shape
    dims = [k + 2 for k, (p, o) in enumerate(zip(shape, tail)) if p == 1 and o != 1]

    def reduce(g: Any) -> Any:
        if dims:
            g = g.sum(dim=dims, keepdim=True)
        return g.reshape(g.shape[0], g.shape[1], -1)

    rec.add(name, "direct", out, None, reduce)
    return True, out
