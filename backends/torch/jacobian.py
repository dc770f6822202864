"""The PyTorch backend's Jacobian path: blocked ``torch.func`` Jacobians, one GEMM per block.

Every engine of the backend starts from a :class:`cvcore.backends.torch.setup.Setup`
(:func:`cvcore.backends.torch.setup.prepare`); :func:`choose_jacobian` picks the Jacobian function (``torch.func``, TorchScript, a
static-batch export); :func:`assemble` accumulates the kernel over a plan's parameter
groups and sample blocks. Built on :mod:`cvcore.backends.torch.setup` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from cvcore import progress
from cvcore.blocking import BlockPlan, Group
from cvcore.data_io import batch_size, slice_inputs
from cvcore.errors import ModelError
from cvcore.imports import require
from cvcore.outputs import check_finite
from cvcore.protocols import KernelRequest, OutputSelector

from .setup import (
    Prepared,
    call,
    fcall,
    pad_batch,
    select_output,
)

if TYPE_CHECKING:
    import torch


JacobianFn = Callable[[Prepared, list[str], Any, KernelRequest], Any]


def functional_jacobian(prep: Prepared, names: list[str], x: Any, request: KernelRequest) -> Any:
    """Per-sample Jacobians of the selected output w.r.t. ``names``: (b, O, P_group)."""
    torch = require("torch")
    from torch.func import jacrev, vmap

    fixed = {**prep.constants, **{k: v for k, v in prep.params.items() if k not in names}}
    output = request.output

    def single(theta: dict[str, Any], xi: Any) -> Any:
        batched = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), xi)
        raw = fcall(prep.module, {**fixed, **theta}, batched)
        return select_output(raw, output).reshape(-1)

    theta = {k: prep.params[k] for k in names}
    if request.train:
        return _batched_jacobian(prep, fixed, theta, x, output)
    try:
        jac = vmap(jacrev(single), in_dims=(None, 0))(theta, x)
    except RuntimeError as exc:
        if "random operation" in str(exc):
            raise ModelError(
                "expected a forward that draws no random numbers in eval mode, got one that "
                "does (torch.randn_like or similar): its kernel changes with every draw; "
                "measure a deterministic output (family='autoencoder' measures a VAE's "
                "posterior mean) or make the sampling conditional on self.training"
            ) from None
        if not vmap_refusal(exc):
            raise
        # A forward with side effects (in-place buffer updates, data-dependent Python
        # control flow) or a fused kernel that writes in place (nn.GRU / nn.RNN's
        # ``_VF`` calls broadcast their hidden state in place) cannot run under
        # torch.func transforms: one sample at a time, the same meaning.
        return torch.cat([_batched_jacobian(prep, fixed, theta, slice_inputs(x, i, i + 1), output)
                          for i in range(batch_size(x))])
    return torch.cat([jac[k].reshape(jac[k].shape[0], jac[k].shape[1], -1) for k in names], dim=2)


def vmap_refusal(exc: RuntimeError) -> bool:
    """Whether ``exc`` is ``torch.func.vmap`` refusing the forward (not a user error)."""
    text = str(exc)
    return ("mutate a captured Tensor" in text or "vmap" in text
            or "doesn't match the broadcast shape" in text)


def _batched_jacobian(prep: Prepared, fixed: dict[str, Any], theta: dict[str, Any], x: Any,
                      output: OutputSelector | None) -> Any:
    """Jacobian of one batched forward (train mode: batch statistics couple the samples,
    and the forward may update buffers in place, which ``torch.func`` transforms refuse)."""
    torch = require("torch")
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    with torch.enable_grad():
        out = select_output(fcall(prep.module, {**fixed, **leaves}, x), output)
        out = out.reshape(batch_size(x), -1)
        b, o = out.shape
        eye = torch.eye(b * o, dtype=out.dtype, device=out.device).reshape(b * o, b, o)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=eye,
                                    is_grads_batched=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros(b * o, *t.shape, dtype=out.dtype,
                                                          device=out.device)).reshape(b, o, -1)
                      for g, t in zip(grads, leaves.values())], dim=2)


def fixed_batch_jacobian(prep: Prepared, names: list[str], x: Any, request: KernelRequest) -> Any:
    """Jacobians for an exported program with a static batch size: pad the block to that
    size and differentiate the batched call (samples do not interact in eval mode)."""
    torch = require("torch")
    from torch.func import jacrev

    size = prep.export_batch or 1
    fixed = {**prep.constants, **{k: v for k, v in prep.params.items() if k not in names}}
    n = batch_size(x)
    pieces = []
    for start in range(0, n, size):
        block = slice_inputs(x, start, min(start + size, n))
        b = batch_size(block)
        padded = pad_batch(block, size)

        def batched(th: dict[str, Any], inp: Any = padded) -> Any:
            raw = fcall(prep.module, {**fixed, **th}, inp)
            return select_output(raw, request.output).reshape(size, -1)

        jac = jacrev(batched)({k: prep.params[k] for k in names})
        pieces.append(torch.cat([jac[k].reshape(size, jac[k].shape[1], -1) for k in names], dim=2)[:b])
    return torch.cat(pieces)


def scripted_jacobian(prep: Prepared, names: list[str], x: Any, request: KernelRequest) -> Any:
    """The slow path for TorchScript modules (``torch.func`` refuses them): one
    ``autograd.grad`` per sample and output, on the module's own parameter leaves."""
    torch = require("torch")
    module = prep.module
    leaves = dict(module.named_parameters())
    wanted = [leaves[k] for k in names]
    rows = []
    for i in range(batch_size(x)):
        out = select_output(call(module, slice_inputs(x, i, i + 1)), request.output).reshape(-1)
        per_out = []
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], wanted, retain_graph=True, allow_unused=True)
            per_out.append(torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1)
                                      for g, w in zip(grads, wanted)]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows).detach()


def _output_range(output: OutputSelector | None, start: int, stop: int) -> OutputSelector:
    """An output selector for outputs ``start:stop`` of the flattened per-sample output."""

    def pick(raw: Any) -> Any:
        chosen = select_output(raw, output)
        return chosen.reshape(chosen.shape[0], -1)[:, start:stop]

    return pick


def assemble(prep: Prepared, x: Any, request: KernelRequest, plan: BlockPlan, jac: JacobianFn,
              n_outputs: int, device: str, dtype: torch.dtype) -> Any:
    """Accumulate the kernel over parameter groups and pairs of row blocks (samples ×
    outputs), on the device; each block's Jacobian is computed in chunks of samples."""
    torch = require("torch")
    names = list(prep.params)
    n = batch_size(x)
    traced = request.kernel == "traced"
    width = 1 if traced else n_outputs
    kernel = torch.zeros((n * width, n * width), dtype=dtype, device=device)
    k4 = kernel.view(n, width, n, width)
    scale = 1.0 / n_outputs if traced else 1.0
    Block = tuple[tuple[int, int], tuple[int, int]]

    for group in plan.groups:
        group_names = [names[i] for i in group.members]
        if request.train:  # the probe set is one batch: batch statistics couple samples
            blocks: list[Block] = [((0, n), (0, n_outputs))]
        else:
            blocks = [(s, o) for o in plan.output_blocks(group) for s in plan.sample_blocks(group)]

        def jacobian(block: Block, group: Group = group,
                     group_names: list[str] = group_names) -> Any:
            (a, b), (o0, o1) = block
            req = request if (o0, o1) == (0, n_outputs) else dataclasses.replace(
                request, output=_output_range(request.output, o0, o1))
            chunks = [(a, b)] if request.train else plan.chunks(group, a, b)
            return torch.cat([jac(prep, group_names, slice_inputs(x, c0, c1), req)
                              for c0, c1 in chunks])

        for index, first in enumerate(blocks):
            j1 = jacobian(first)
            _add_block(k4, j1, j1, first, first, traced, scale, mirror=False)
            for second in blocks[index + 1:]:
                if traced and second[1] != first[1]:
                    continue  # the traced kernel pairs each output with itself only
                _add_block(k4, j1, jacobian(second), first, second, traced, scale, mirror=True)
            progress.advance("sample blocks", index + 1, len(blocks))
    out = kernel.detach().cpu().numpy()
    check_finite(out.diagonal(), n, width)
    return out


def _add_block(k4: Any, j1: Any, j2: Any, first: Any, second: Any, traced: bool, scale: float,
               mirror: bool) -> None:
    """Add ``J1 J2ᵀ`` for two row blocks (and its transpose at the mirrored place)."""
    (a1, b1), (o1, p1) = first
    (a2, b2), (o2, p2) = second
    if traced:  # (b, O_block, P) -> (b, O_block·P); the 1/O is over all outputs
        block = scale * (j1.reshape(j1.shape[0], -1) @ j2.reshape(j2.shape[0], -1).T)
        k4[a1:b1, 0, a2:b2, 0] += block
        if mirror:
            k4[a2:b2, 0, a1:b1, 0] += block.T
        return
    block = (j1.reshape(-1, j1.shape[2]) @ j2.reshape(-1, j2.shape[2]).T).reshape(
        b1 - a1, p1 - o1, b2 - a2, p2 - o2)
    k4[a1:b1, o1:p1, a2:b2, o2:p2] += block
    if mirror:
        k4[a2:b2, o2:p2, a1:b1, o1:p1] += block.permute(2, 3, 0, 1)


def choose_jacobian(prep: Prepared) -> JacobianFn:
    """The Jacobian function for a prepared model: TorchScript, a static-batch export, or
    ``torch.func`` (everything else)."""
    if prep.scripted:
        return scripted_jacobian
    if prep.export_batch is not None:
        return fixed_batch_jacobian
    return functional_jacobian


def jacobian_groups(model: Any, input_sets: tuple[Any, ...], request: KernelRequest,
                    device: str) -> Iterator[tuple[Any, ...]]:
    """What ``TorchBackend.jacobians`` yields: per parameter group, the per-sample
    Jacobians ``(N_s, *S, P_group)`` of every input set as NumPy, by the generic Jacobian
    path (the structured path builds self kernels only). Several input sets are measured
    in eval mode only: a batch-statistics forward couples the samples of one batch, and
    two batches have two sets of statistics."""
    torch = require("torch")
    import numpy as np

    from cvcore.blocking import plan_blocks
    from cvcore.errors import InputError

    from .setup import as_inputs, full_precision, prepare, training_mode

    if len(input_sets) > 1 and request.train:
        raise InputError("expected train=False for a kernel between two input sets (batch "
                         "statistics of one batch do not apply to another), got train=True")
    s = prepare(model, input_sets[0], request, device)
    prep = s.prep
    xs = [s.x] + [as_inputs(x, s.dtype, device) for x in input_sets[1:]]
    shapes = [sample_shape(prep, x, request) for x in xs]
    if any(shape != shapes[0] for shape in shapes):
        raise InputError(f"expected input sets whose outputs have one per-sample shape, got "
                         f"{[list(sh) for sh in shapes]}")
    jac = choose_jacobian(prep)
    names = list(prep.params)
    sizes = [batch_size(x) for x in xs]
    plan = plan_blocks(n_samples=sum(sizes), n_outputs=s.n_outputs,
                       group_sizes=[int(p.numel()) for p in prep.params.values()],
                       itemsize=s.itemsize, budget=request.memory_budget)
    with training_mode(prep.module, request.train), full_precision():
        for group in plan.groups:
            group_names = [names[i] for i in group.members]
            out = []
            for x, n in zip(xs, sizes):
                chunks = [(0, n)] if request.train else plan.chunks(group, 0, n)
                j = torch.cat([jac(prep, group_names, slice_inputs(x, a, b), request)
                               for a, b in chunks])
                out.append(np.asarray(j.detach().cpu().numpy()).reshape(n, *shapes[0], -1))
            yield tuple(out)


def sample_shape(prep: Prepared, x: Any, request: KernelRequest) -> tuple[int, ...]:
    """One sample's output shape (under ``train=True`` the whole batch's, first axis off)."""
    torch = require("torch")

    from .setup import forward, probe, training_mode

    with training_mode(prep.module, request.train), torch.no_grad():
        if request.train:
            return tuple(int(d) for d in forward(prep, x, request.output).shape[1:])
        return tuple(int(d) for d in probe(prep, x, request.output).shape)


def output_shape(model: Any, inputs: Any, request: KernelRequest, device: str
                 ) -> tuple[int, ...]:
    """What ``TorchBackend.output_shape`` returns: one sample's output shape ``S``."""
    from .setup import prepare

    s = prepare(model, inputs, request, device)
    return sample_shape(s.prep, s.x, request)
