"""Structured (per-layer) NTK for PyTorch: layer identities instead of Jacobians.

The kernel is a sum over parameter tensors, ``K = Σ_p J_p J_pᵀ``, so each parameter can
be measured its own way and the sum stays exact:

* parameters whose every use is a recognised op (see
  :mod:`cvcore.backends.torch.capture`) get a layer identity from
  :mod:`cvcore.backends.torch.rules` built from the layer inputs ``A`` (one batched
  forward pass) and the output-gradients ``G`` (one batched backward pass per model
  output; samples are independent in eval mode);
* every other trainable parameter goes through the blocked Jacobian path of
  :mod:`cvcore.backends.torch.jacobian`, restricted to exactly those parameters.

A module used several times (shared weights) contributes ``Σ_u A_u ⊗ G_u``: its uses are
concatenated along the position axis before the identity is applied, which is exact.
In train mode, or when a call couples samples (batch norm with batch statistics),
:func:`structured_kernel` returns ``None`` and the caller uses the Jacobian path.

Memory: samples are processed in blocks whose captured ``A`` and ``G`` take at most
half of ``request.memory_budget``; pairs of blocks are combined (the later block's
capture is recomputed), and each identity chunks its own intermediates to the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cvcore import progress
from cvcore.blocking import dense_costs
from cvcore.outputs import check_finite
from cvcore.protocols import KernelRequest

from .capture import Capture, forward_capture, structured_names
from .rules import Feature, dense_part, feature_gram, tie
from .setup import Prepared


@dataclass
class Block:
    """Features of one block of samples, keyed by ``(parameter, row block)``."""

    features: dict[tuple[str, int], Feature]
    structured: frozenset[str]
    tainted: frozenset[str]
    #: parameters with rules whose uses failed the row checks (measured by the Jacobian path)
    excluded: frozenset[str] = frozenset()
    #: the rule of every structured parameter: ``"<op> (<kind>)"``, e.g. ``"linear (dense)"``
    rules: dict[str, str] = dataclasses.field(default_factory=dict)


def _output_gradients(out: Any, zs: list[Any], keep_graph: bool = False) -> list[Any]:
    """``∂f_o/∂z`` for every output ``o``, stacked: each ``(n, O, *z.shape[1:])``."""
    import torch

    n_out = int(out.shape[1])
    if not out.requires_grad:  # the output does not depend on anything differentiable
        return [torch.zeros(z.shape[0], n_out, *z.shape[1:], dtype=z.dtype, device=z.device)
                for z in zs]
    per_o: list[tuple[Any, ...]] = []
    for o in range(n_out):
        grads = torch.autograd.grad(out[:, o].sum(), zs, retain_graph=keep_graph or o < n_out - 1,
                                    allow_unused=True)
        per_o.append(grads)
    stacked = []
    for k, z in enumerate(zs):
        cols = [g[k] if g[k] is not None else torch.zeros_like(z) for g in per_o]
        stacked.append(torch.stack(cols, dim=1).detach())
    return stacked


def capture_block(prep: Prepared, x: Any, request: KernelRequest, keep: frozenset[str] | None = None,
                  check: bool = False) -> Block:
    """Features of every structured parameter for the samples ``x``.

    Only uses that belong row by row to the samples get features
    (:mod:`cvcore.backends.torch.rowcheck`): the backward check runs on every block, the
    forward check (a second pass on half the samples) when ``check`` is set, for the
    first block of a measurement.
    """
    from cvcore.data_io import batch_size

    from .rowcheck import backward_check, forward_check

    n = batch_size(x)
    out, cap = forward_capture(prep, x, request.output, n)
    if cap.coupled:
        raise _Coupled()
    excluded: set[str] = set()
    structured = structured_names(cap)
    if check and n >= 2 and structured:
        coupled, excluded = forward_check(prep, x, request, out, cap, structured)
        if coupled:
            raise _Coupled()
        structured = structured_names(cap, excluded)
    wanted = structured if keep is None else structured & keep
    uses, zs, index = _uses_of(cap, wanted)
    grads = _output_gradients(out, zs, keep_graph=n >= 2) if zs else []
    bad = backward_check(out, zs, grads) if zs else set()
    if bad:
        excluded |= {name for u in uses if index[id(u.z)] in bad for name in u.names}
        structured = structured_names(cap, excluded)
        wanted = structured if keep is None else structured & keep
    features: dict[tuple[str, int], Feature] = {}
    rules: dict[str, str] = {}
    for u in uses:
        if set(u.names) <= wanted:
            g = u.shape_g(grads[index[id(u.z)]])
            features[u.key] = _merge(features.get(u.key), Feature(u.kind, g, u.a))
            for name in u.names:
                rules[name] = f"{u.op} ({u.kind})"
    for key, f in features.items():
        if f.kind == "tied":
            rules[key[0]] = "embedding + linear (tied)"
    return Block(features, structured, frozenset(cap.tainted), frozenset(excluded), rules)


def _uses_of(cap: Capture, wanted: frozenset[str]) -> tuple[list[Any], list[Any], dict[int, int]]:
    """The uses of ``wanted`` parameters, their distinct outputs, and each output's index."""
    uses = [u for u in cap.uses if set(u.names) <= wanted]
    zs: list[Any] = []
    index: dict[int, int] = {}
    for u in uses:
        if id(u.z) not in index:
            index[id(u.z)] = len(zs)
            zs.append(u.z)
    return uses, zs, index


class _Coupled(Exception):
    """A recorded call couples the samples of a batch."""


def _merge(old: Feature | None, new: Feature) -> Feature:
    """Combine two uses of one parameter block (shared weights)."""
    import torch

    if old is None:
        return new
    if new.kind == "direct":
        return Feature("direct", old.g + new.g)
    if old.kind != new.kind or new.kind == "tied":  # a tied embedding's two kinds of use
        return tie(old, new, _merge)
    return Feature(new.kind, torch.cat([old.g, new.g], dim=2), torch.cat([old.a, new.a], dim=1))


# ------------------------------------------------------------------------- planning
def _per_sample_bytes(prep: Prepared, x: Any, request: KernelRequest, n_outputs: int) -> int:
    """Bytes one sample's captured inputs and output-gradients take (from a pass on at
    most two samples); raises ``_Coupled`` when a call couples the samples."""
    from cvcore.data_io import batch_size, slice_inputs

    m = min(2, batch_size(x))
    out, cap = forward_capture(prep, slice_inputs(x, 0, m), request.output, m)
    if cap.coupled:
        raise _Coupled()
    seen: set[int] = set()
    total = 0
    for u in cap.uses:
        if u.a is not None:
            total += u.a.numel() * max(1, u.a.element_size())
        if id(u.z) not in seen:
            seen.add(id(u.z))
            total += 2 * n_outputs * u.z.numel() * u.z.element_size()
    del out
    return max(1, total // m)


def _sample_blocks(n: int, per_sample: int, budget: int, max_size: int | None = None
                   ) -> list[tuple[int, int]]:
    size = max(1, min(n, (budget // 2) // per_sample, max_size or n))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _structured_cost(block: Block, n: int, traced: bool) -> float:
    total = 0.0
    parts = [p for f in block.features.values()
             for p in ((dense_part(f), f.tied) if f.kind == "tied" else (f,))]
    for f in parts:
        assert f is not None
        n_out = int(f.g.shape[1])
        if f.kind == "direct":
            total += n * n * n_out * f.g.shape[2] * (1 if traced else n_out)
        else:
            d_in = 1 if f.kind == "embedding" else int(f.a.shape[2])
            s, d_out = int(f.g.shape[2]), int(f.g.shape[3])
            total += min(dense_costs(n, n, n_out, s, d_in, d_out, traced).values())
    return total


def _jacobian_cost(prep: Prepared, names: frozenset[str], n: int, n_outputs: int,
                   traced: bool) -> float:
    size = sum(int(prep.params[k].numel()) for k in names)
    return float(n * n * n_outputs * size * (1 if traced else n_outputs))


def _use_structured(prep: Prepared, first: Block, n: int, n_outputs: int, request: KernelRequest) -> bool:
    """``auto``: whether the structured passes pay for themselves (always under ``structured``)."""
    from cvcore.protocols import Implementation

    if request.implementation == Implementation.STRUCTURED:
        return True
    generic = set(prep.params) - first.structured
    if not generic:
        return True
    traced = request.kernel == "traced"
    # The Jacobian path runs anyway for the generic parameters; the structured passes
    # cost about (1 + O) batched forward passes on top of the identities themselves.
    forward = sum(2.0 * n * f.g.shape[2] * (1 if f.kind != "dense" else f.a.shape[2]) * f.g.shape[-1]
                  for f in first.features.values() if f.kind != "direct")
    extra = (1 + n_outputs) * forward + _structured_cost(first, n, traced)
    return extra < _jacobian_cost(prep, first.structured, n, n_outputs, traced)


# ------------------------------------------------------------------------- assembly
def _add_pair(target: Callable[[str], Any], fa: Block, fb: Block, ra: tuple[int, int],
              rb: tuple[int, int], width: int, traced: bool, budget: int) -> None:
    """Add every feature's kernel block to ``target(parameter name)``."""
    sa = slice(ra[0] * width, ra[1] * width)
    sb = slice(rb[0] * width, rb[1] * width)
    for key, f in fa.features.items():
        block = feature_gram(f, fb.features[key], traced, budget)
        kernel = target(key[0])
        kernel[sa, sb] += block
        if ra != rb:
            kernel[sb, sa] += block.T


def _generic_kernel(prep: Prepared, x: Any, request: KernelRequest, names: list[str], n_outputs: int) -> Any:
    """The Jacobian path restricted to ``names`` (the other parameters held fixed)."""
    import dataclasses

    import torch

    from cvcore.blocking import plan_blocks
    from cvcore.data_io import batch_size

    from .jacobian import assemble, functional_jacobian

    sub = dataclasses.replace(
        prep, params={k: prep.params[k] for k in names},
        constants={**prep.constants, **{k: v for k, v in prep.params.items() if k not in names}})
    dtype = next(iter(prep.params.values())).dtype
    plan = plan_blocks(n_samples=batch_size(x), n_outputs=n_outputs,
                       group_sizes=[int(sub.params[k].numel()) for k in names],
                       itemsize=torch.finfo(dtype).bits // 8, budget=request.memory_budget)
    device = str(next(iter(prep.params.values())).device)
    return assemble(sub, x, request, plan, functional_jacobian, n_outputs, device, dtype)


def structured_kernel(prep: Prepared, x: Any, request: KernelRequest, n_outputs: int,
                      rules: dict[str, str] | None = None) -> Any:
    """The kernel from per-layer identities, or ``None`` to use the Jacobian path.

    Args:
        prep: the prepared model (``cvcore.backends.torch.setup.Prepared``).
        x: the inputs, on the device and in the dtype of the computation.
        request: the :class:`cvcore.protocols.KernelRequest`.
        n_outputs: outputs per sample ``O``.
        rules: filled, when given, with the rule of every parameter a rule measured.

    Returns:
        The kernel as a NumPy array (traced ``N × N`` divided by ``O``, or full
        ``N·O × N·O`` with row ``i·O + o``), like the Jacobian path; ``None`` in train
        mode, when samples are coupled, or when no parameter has a rule.
    """
    parts = structured_parts(prep, x, request, n_outputs, lambda name: "", rules)
    return None if parts is None else parts[""]


def structured_parts(prep: Prepared, x: Any, request: KernelRequest, n_outputs: int,
                     part_of: Callable[[str], str], rules: dict[str, str] | None = None
                     ) -> dict[str, Any] | None:
    """The kernel split into parts (``part_of(parameter name)``, e.g. its layer), each a
    NumPy array; the parts sum to :func:`structured_kernel`'s kernel. ``None`` as there."""
    if request.train:
        return None
    import torch

    from cvcore.data_io import batch_size, slice_inputs

    n = batch_size(x)
    traced = request.kernel == "traced"
    budget = int(request.memory_budget)
    width = 1 if traced else n_outputs
    ref = next(iter(prep.params.values()))
    # A pair of blocks makes kernel-block temporaries of (b·width)² entries, about three
    # at a time: keep them within half the budget too.
    pair_limit = int(math.sqrt(budget / (6 * ref.element_size()))) // width
    try:
        blocks = _sample_blocks(n, _per_sample_bytes(prep, x, request, n_outputs), budget,
                                max_size=max(1, pair_limit))
        first = capture_block(prep, slice_inputs(x, *blocks[0]), request, check=True)
    except _Coupled:
        return None
    if not first.structured or not _use_structured(prep, first, n, n_outputs, request):
        return None
    parts: dict[str, Any] = {}
    for name in prep.params:
        if part_of(name) not in parts:
            parts[part_of(name)] = torch.zeros((n * width, n * width), dtype=ref.dtype,
                                               device=ref.device)
    try:
        _assemble_structured(lambda name: parts[part_of(name)], prep, x, request, blocks, first,
                             width, traced, budget)
    except _Inconsistent:
        return None
    generic: dict[str, list[str]] = {}
    for k in prep.params:
        if k not in first.structured:
            generic.setdefault(part_of(k), []).append(k)
    for part, names in generic.items():
        extra = _generic_kernel(prep, x, request, names, n_outputs)
        parts[part] += torch.from_numpy(extra).to(device=ref.device, dtype=ref.dtype)
    out = {part: kernel.detach().cpu().numpy() for part, kernel in parts.items()}
    for kernel in out.values():
        check_finite(kernel.diagonal(), n, width)
    if rules is not None:
        rules.update({k: v for k, v in first.rules.items() if k in first.structured})
    return out


class _Inconsistent(Exception):
    """Two sample blocks disagree on which parameters have a rule."""


def _capture_like(prep: Prepared, x: Any, request: KernelRequest, first: Block) -> Block:
    try:
        block = capture_block(prep, x, request, keep=first.structured)
    except _Coupled:
        raise _Inconsistent() from None
    if not first.structured <= block.structured or block.features.keys() != first.features.keys():
        raise _Inconsistent()
    return block


def _assemble_structured(target: Callable[[str], Any], prep: Prepared, x: Any, request: KernelRequest,
                         blocks: list[tuple[int, int]], first: Block, width: int, traced: bool,
                         budget: int) -> None:
    from cvcore.data_io import slice_inputs

    for i, ra in enumerate(blocks):
        fa = first if i == 0 else _capture_like(prep, slice_inputs(x, *ra), request, first)
        _add_pair(target, fa, fa, ra, ra, width, traced, budget)
        for rb in blocks[i + 1:]:
            fb = _capture_like(prep, slice_inputs(x, *rb), request, first)
            _add_pair(target, fa, fb, ra, rb, width, traced, budget)
        progress.advance("sample blocks", i + 1, len(blocks))
