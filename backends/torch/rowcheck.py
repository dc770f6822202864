"""Which recorded layer uses provably belong, row by row, to the probe samples.

A layer rule of :mod:`cvcore.backends.torch.rules` builds sample r's gradient from row r
of the layer's recorded input ``a`` and of its output-gradient ``g``. That is exact only
when, for every sample r,

1. row r of ``a`` and of the layer output ``z`` is what sample r gives alone (forward
   locality), and
2. no other sample's output depends on row r of ``z``: ``∂f_i/∂z_r = 0`` for ``i ≠ r``
   (backward locality), so that the batched backward's ``∂(Σ_i f_i)/∂z_r`` is sample r's
   own ``∂f_r/∂z_r``.

A leading size equal to the number of samples proves neither (a graph's node table, a
parameter table indexed by the probe, a batch mean). Two checks establish them:

* :func:`forward_check`: a second forward pass on a random half of the block's samples
  (at most 16 of them).
  A use must be recorded again, in the same order, with its leading size following the
  number of samples (a buffer's or a graph's rows do not), and its ``a`` and ``z`` must
  equal the full pass's rows of the same samples; the outputs too. Anything that mixes
  rows (a batch mean, attention over the batch) changes when half the batch is gone.
* :func:`backward_check`: one extra backward pass of ``Σ_io w_i u_o f_io`` with Gaussian
  ``w``, ``u``. Under backward locality its gradient at ``z_r`` is ``w_r Σ_o u_o g_ro``
  exactly; any cross-sample term ``∂f_i/∂z_r`` (i ≠ r) shows up, for every row at once,
  except on a set of ``w`` of probability zero.

Failing uses send their parameters to the Jacobian path; outputs that change with the
other samples mean the forward couples samples, and the whole kernel goes to the
Jacobian path, which differentiates each sample alone.
"""

from __future__ import annotations

from typing import Any

from cvcore.protocols import KernelRequest

from .capture import Capture
from .setup import Prepared

#: Relative agreement two computations of the same rows must reach, by dtype.
_TOLERANCE = {"float64": 1e-9, "float32": 2e-4}


def tolerance(dtype: Any) -> float:
    return _TOLERANCE["float64" if str(dtype).endswith("float64") else "float32"]


def close(a: Any, b: Any, tol: float) -> bool:
    """Whether two tensors agree to ``tol`` relative to the larger of their magnitudes."""
    import torch

    if tuple(a.shape) != tuple(b.shape):
        return False
    a, b = a.detach(), b.detach()
    if a.numel() == 0:
        return True
    if not a.is_floating_point():  # token ids
        return bool(torch.equal(a, b))
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale + 1e-300


def take_rows(x: Any, index: Any) -> Any:
    """Samples ``index`` of every tensor in ``x`` (a tensor, dict or tuple of them)."""
    import torch

    return torch.utils._pytree.tree_map(
        lambda t: t[index] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t, x)


#: At most this many samples in the forward check's second pass.
SUBSET = 16


def half(n: int, seed: int = 0) -> list[int]:
    """A fixed random subset of ``range(n)``, in order: half of it, at most
    :data:`SUBSET` samples (at least one, never all)."""
    import numpy as np

    m = max(1, min(n // 2, SUBSET))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=m, replace=False))


def _restricted(uses: list[Any], names: frozenset[str]) -> list[Any]:
    return [u for u in uses if set(u.names) <= names]


def forward_check(prep: Prepared, x: Any, request: KernelRequest, out: Any, cap: Capture,
                  structured: frozenset[str]) -> tuple[bool, set[str]]:
    """Compare the full capture with one on a random half of its samples.

    Returns:
        ``(coupled, excluded)``: whether the outputs of the half differ from the full
        pass's (the forward couples samples), and the parameters whose uses failed.
    """
    import torch

    from .capture import forward_capture, structured_names

    n = int(out.shape[0])
    index = half(n)
    try:
        sub_out, sub = forward_capture(prep, take_rows(x, index), request.output, len(index))
    except Exception:  # noqa: BLE001 - a forward that fails on fewer samples proves nothing
        return True, set(structured)
    tol = tolerance(out.dtype)
    rows = torch.as_tensor(index, device=out.device)
    with torch.no_grad():
        if sub.coupled or not close(sub_out, out[rows], tol):
            return True, set(structured)
        kept = structured & structured_names(sub)
        full_uses, sub_uses = _restricted(cap.uses, kept), _restricted(sub.uses, kept)
        if [(u.key, u.kind, u.also) for u in full_uses] != [(u.key, u.kind, u.also) for u in sub_uses]:
            return False, set(structured)  # other samples take other paths: no rule is safe
        excluded = set(structured - kept)
        for full, part in zip(full_uses, sub_uses):
            same = close(part.z, full.z[rows], tol) and (
                full.a is None or close(part.a, full.a[rows], tol))
            if not same:
                excluded.update(full.names)
    return False, excluded


def backward_check(out: Any, zs: list[Any], grads: list[Any], seed: int = 0) -> set[int]:
    """Indices of the ``zs`` whose rows feed other samples' outputs (see the module doc).

    ``grads[k]`` is ``∂(Σ_i f_io)/∂z_k`` stacked over outputs, ``(n, O, *z.shape[1:])``;
    the autograd graph of ``out`` must still be alive.
    """
    import torch

    n, n_out = int(out.shape[0]), int(out.shape[1])
    if n < 2 or not zs or not out.requires_grad:
        return set()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    u = torch.randn(1, n_out, generator=gen, dtype=torch.float64)
    weights = (w * u).to(device=out.device, dtype=out.dtype)
    mixed = torch.autograd.grad((out * weights).sum(), zs, allow_unused=True)
    tol = tolerance(out.dtype)
    bad: set[int] = set()
    with torch.no_grad():
        for k, (got, g) in enumerate(zip(mixed, grads)):
            expect = (g * weights.reshape(n, n_out, *([1] * (g.dim() - 2)))).sum(1)
            if got is None:
                got = torch.zeros_like(expect)
            if not close(got, expect, tol):
                bad.add(k)
    return bad
