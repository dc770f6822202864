"""The PyTorch NTK as a matrix-free operator: ``K V = J (Jᵀ V)``, never forming ``J`` or ``K``.

``Jᵀ V`` is a vector-Jacobian product (``torch.func.vjp``, one forward per chunk of
samples, ``vmap``-ed over the vectors), ``J u`` a Jacobian-vector product
(``torch.func.jvp``, ``vmap``-ed over the ``u``). Two passes over the samples per batch of
vectors: the first accumulates ``u = Jᵀ v`` over sample chunks, the second applies ``J``.

Conventions (``docs/concepts.md``):

* full: ``v ∈ R^{N·O}`` is the cotangent reshaped ``(N, O)`` (row ``i·O + o``);
* traced: ``K v = (1/O) Σ_o J_o (J_oᵀ v)``, one cotangent per output ``o`` (``v`` in
  column ``o``, zeros elsewhere). A single cotangent ``v ⊗ 1_O`` would add the cross
  terms ``J_o J_o'ᵀ`` and is wrong. The traced matvec therefore costs ``O`` times the
  full one per vector.

Memory: the vectors are processed in groups so that the group's ``u`` (``g · P`` floats)
and its per-sample activations stay within the request's memory budget; the samples in
chunks so that ``g`` vectors' backward and forward-mode activations for a chunk fit too.
Activations per sample are measured once with saved-tensor hooks on a 1- and a 2-sample
forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.blocking import OperatorBudget
from cvcore.protocols import JacobianProbes, KernelOperator, KernelRequest, OutputSelector

from .setup import Prepared


def _activation_bytes(prep: Prepared, x: Any, output: OutputSelector | None, n: int) -> int:
    """Bytes autograd saves per sample (the difference of a 2- and a 1-sample forward)."""
    import torch

    from cvcore.data_io import slice_inputs

    from .setup import fcall, select_output

    def saved(m: int) -> int:
        total = 0

        def pack(t: Any) -> Any:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        leaves = {k: v.detach().requires_grad_(True) for k, v in prep.params.items()}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = select_output(fcall(prep.module, {**prep.constants, **leaves},
                                      slice_inputs(x, 0, m)), output)
        return total + out.numel() * out.element_size()

    one = saved(1)
    per_sample = saved(2) - one if n > 1 else one
    return max(per_sample, 1)


@dataclass
class _TorchKernelOperator(OperatorBudget):
    """``matvec`` state: the prepared model, the inputs and the blocking limits."""

    prep: Prepared
    x: Any
    output: OutputSelector | None
    traced: bool
    n: int
    n_outputs: int
    budget: int
    param_bytes: int
    act_bytes: int

    def function(self, a: int, b: int) -> Callable[[dict[str, Any]], Any]:
        """``θ ↦ f(x[a:b]; θ)`` as a ``(b - a, O)`` tensor."""
        from cvcore.data_io import slice_inputs

        from .setup import fcall, select_output

        xs = slice_inputs(self.x, a, b)
        constants, module, output = self.prep.constants, self.prep.module, self.output

        def f(theta: dict[str, Any]) -> Any:
            raw = fcall(module, {**constants, **theta}, xs)
            return select_output(raw, output).reshape(b - a, -1)

        return f

    def cotangents(self, v: Any, e0: int, e1: int, a: int, b: int) -> Any:
        """Cotangents ``(g, b - a, O)`` of expanded vectors ``e0:e1`` on samples ``a:b``."""
        import torch

        o = self.n_outputs
        if not self.traced:
            return v[a * o:b * o, e0:e1].T.reshape(e1 - e0, b - a, o)
        idx = torch.arange(e0, e1, device=v.device)
        cot = torch.zeros((e1 - e0, b - a, o), dtype=v.dtype, device=v.device)
        cot[torch.arange(e1 - e0, device=v.device), :, idx % o] = v[a:b, idx // o].T
        return cot

    def scatter(self, out: Any, y: Any, e0: int, e1: int, a: int, b: int) -> None:
        """Add the products ``y`` ``(g, b - a, O)`` into the result's rows and columns."""
        import torch

        o = self.n_outputs
        if not self.traced:
            out[a * o:b * o, e0:e1] += y.reshape(e1 - e0, -1).T
            return
        idx = torch.arange(e0, e1, device=out.device)
        picked = y[torch.arange(e1 - e0, device=out.device), :, idx % o]  # (g, b - a)
        out[a:b].index_add_(1, idx // o, picked.T / o)

    def apply_group(self, v: Any, out: Any, e0: int, e1: int) -> None:
        """``K`` on expanded vectors ``e0:e1``: ``u = Jᵀ c`` over all chunks, then ``J u``."""
        from torch.func import jvp, vjp

        theta = self.prep.params
        chunks = self.chunks(e1 - e0)
        u: dict[str, Any] | None = None
        for a, b in chunks:
            vjp_fn = vjp(self.function(a, b), theta)[1]
            (grads,) = _batched(vjp_fn, self.cotangents(v, e0, e1, a, b))
            u = grads if u is None else {k: u[k] + grads[k] for k in u}
        assert u is not None
        for a, b in chunks:
            f = self.function(a, b)

            def push(t: Any, f: Callable[[dict[str, Any]], Any] = f) -> Any:
                return jvp(f, (theta,), (t,))[1]

            y = _batched(push, u)
            self.scatter(out, y, e0, e1, a, b)

    def _matvec(self, block: NDArray[np.float64]) -> NDArray[np.float64]:
        import torch

        ref = next(iter(self.prep.params.values()))
        v = torch.from_numpy(np.ascontiguousarray(block)).to(device=ref.device, dtype=ref.dtype)
        out = torch.zeros_like(v)
        total = v.shape[1] * (self.n_outputs if self.traced else 1)
        group = self.group_size(total)
        with torch.no_grad():
            for e0 in range(0, total, group):
                self.apply_group(v, out, e0, min(e0 + group, total))
        res: NDArray[np.float64] = out.detach().cpu().numpy().astype(np.float64)
        return res


def _batched(fn: Callable[[Any], Any], batch: Any) -> Any:
    """``vmap(fn)(batch)``; a loop when the model cannot run under ``vmap``."""
    import torch
    from torch.func import vmap

    try:
        return vmap(fn)(batch)
    except RuntimeError as exc:
        from .jacobian import vmap_refusal

        if not vmap_refusal(exc):
            raise
    leaves, spec = torch.utils._pytree.tree_flatten(batch)
    results = [fn(torch.utils._pytree.tree_unflatten([t[i] for t in leaves], spec))
               for i in range(leaves[0].shape[0])]
    return torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *results)


def _eval_setup(model: Any, inputs: Any, request: KernelRequest, what: str, advice: str = ""
                ) -> tuple[Prepared, Any, int, Any]:
    """The model prepared in the request's precision on its device, and the inputs:
    ``(prep, x, n, dtype)``; eval mode only, no TorchScript (``torch.func``
    cannot transform it), at least one sample."""
    import torch

    from cvcore.data_io import batch_size, require_samples
    from cvcore.errors import ModelError
    from cvcore.validate import require_eval

    from .setup import as_inputs, prepare_model, resolve_device

    require_eval(request)
    device = resolve_device(request.device)
    dtype = torch.float64 if request.dtype == "float64" else torch.float32
    prep = prepare_model(model, dtype, device)
    if prep.scripted:
        raise ModelError(f"expected an nn.Module or a torch.export program for {what}, got a "
                         f"TorchScript module{advice}")
    x = as_inputs(inputs, dtype, device)
    n = batch_size(x)
    require_samples(n)
    return prep, x, n, dtype


def kernel_operator(model: Any, inputs: Any, request: KernelRequest) -> KernelOperator:
    """What ``TorchBackend.operator`` returns: the NTK as a :class:`cvcore.protocols.KernelOperator`.

    Args:
        model: an ``nn.Module`` or a ``torch.export`` program with a dynamic batch.
        inputs: the probe inputs, batch first.
        request: the :class:`cvcore.protocols.KernelRequest`; ``dtype`` is the precision
            of the products (vectors are float64 in and out), ``memory_budget`` bounds the
            vectors' parameter-sized products and the activations per sample chunk.

    Raises:
        InputError: empty inputs, or ``train=True`` (the operator measures eval mode).
        ModelError: a TorchScript module or a program exported with a static batch
            (``torch.func`` cannot transform them), or an integer output.
    """
    import torch

    from cvcore.errors import ModelError

    from .setup import (
        full_precision,
        training_mode,
    )
    from .setup import probe as probe_output

    prep, x, n, dtype = _eval_setup(
        model, inputs, request, "the matrix-free operator", "; use method='exact'")
    with training_mode(prep.module, False), torch.no_grad():
        probe = probe_output(prep, x, request.output)
    if prep.export_batch is not None:
        raise ModelError(f"expected a torch.export program with a dynamic batch for the "
                         f"matrix-free operator, got a static batch of {prep.export_batch}; "
                         "use method='exact'")
    if not probe.is_floating_point():
        raise ModelError(f"expected a floating-point output to differentiate, got {probe.dtype}; "
                         "pick another output with output=")
    n_params = sum(int(p.numel()) for p in prep.params.values())
    with training_mode(prep.module, False):
        act = _activation_bytes(prep, x, request.output, n)
    op = _TorchKernelOperator(prep=prep, x=x, output=request.output,
                              traced=request.kernel == "traced", n=n,
                              n_outputs=int(probe.numel()), budget=int(request.memory_budget),
                              param_bytes=n_params * torch.finfo(dtype).bits // 8, act_bytes=act)

    def matvec(vectors: NDArray[np.float64]) -> NDArray[np.float64]:
        with training_mode(prep.module, False), full_precision():
            return op.matvec(vectors)

    return KernelOperator(matvec=matvec, dim=op.dim, n_samples=n, n_outputs=op.n_outputs,
                          n_params=n_params)


def jacobian_probes(model: Any, inputs: Any, request: KernelRequest, sample_axes: int = 1
                    ) -> JacobianProbes:
    """What ``TorchBackend.probes`` returns: the output Jacobian as
    :class:`cvcore.protocols.JacobianProbes`, reached through vector-Jacobian products only.

    One forward pass over all the inputs keeps its graph; every cotangent then costs one
    backward pass, and ``m`` of them hold ``m`` parameter-sized gradients for their Gram
    matrix. With ``sample_axes=2`` the selected output has shape ``(B, S, O)`` and its
    ``B·S`` rows are the samples (a language model's positions). With one output per sample
    the same forward pass gives the exact kernel (``kernel``, :func:`_loss_gram`).

    Raises:
        InputError: empty inputs, ``train=True``, ``sample_axes`` not 1 or 2, or an output
            of fewer than 3 axes with ``sample_axes=2``.
        ModelError: a TorchScript module, or an integer output.
    """
    import torch

    from cvcore.errors import InputError, ModelError

    from .setup import (
        fcall,
        full_precision,
        select_output,
        training_mode,
    )

    if sample_axes not in (1, 2):
        raise InputError(f"expected sample_axes 1 or 2, got {sample_axes!r}")
    prep, x, n, _ = _eval_setup(model, inputs, request, "the probes")
    leaves = {k: v.detach().requires_grad_(True) for k, v in prep.params.items()}
    capture = _Capture(prep.module, set(leaves)) if sample_axes == 1 else None
    try:
        with training_mode(prep.module, False), full_precision(), torch.enable_grad():
            out = select_output(fcall(prep.module, {**prep.constants, **leaves}, x),
                                request.output)  # one forward; its graph serves every cotangent
            out = out.reshape(n, -1) if sample_axes == 1 else out
    finally:
        if capture is not None:
            capture.remove()
    if not out.is_floating_point():
        raise ModelError(f"expected a floating-point output to differentiate, got {out.dtype}")
    if sample_axes == 2 and out.dim() < 3:
        raise InputError(f"expected an output of shape (B, S, O) for sample_axes=2, got "
                         f"{tuple(out.shape)}")
    n_out = int(out.shape[-1])
    n_rows = int(out.numel()) // n_out
    params = list(leaves.values())

    def gram(a: NDArray[np.float64], s: NDArray[np.float64]) -> NDArray[np.float64]:
        grads: list[list[Any]] = []
        g = np.zeros((a.shape[0], a.shape[0]))
        with training_mode(prep.module, False), full_precision():
            for j in range(a.shape[0]):
                aj = torch.from_numpy(np.ascontiguousarray(a[j])).to(device=out.device, dtype=out.dtype)
                sj = torch.from_numpy(np.ascontiguousarray(s[j])).to(device=out.device, dtype=out.dtype)
                gj = torch.autograd.grad(out, params, (aj @ sj.T).reshape(out.shape),
                                         retain_graph=True, allow_unused=True)
                grads.append([t.reshape(-1) for t in gj if t is not None])
                for l_ in range(j + 1):
                    g[j, l_] = g[l_, j] = sum(float(torch.dot(u, w))
                                              for u, w in zip(grads[j], grads[l_]))
        return g

    def outputs() -> NDArray[Any]:
        arr: NDArray[Any] = out.detach().reshape(n_rows, n_out).cpu().numpy()
        return arr

    def kernel() -> NDArray[np.float64] | None:
        if capture is None or n_out != 1 or not capture.complete:
            return None
        with training_mode(prep.module, False), full_precision():
            return _loss_gram(capture, out, n, int(request.memory_budget))

    return JacobianProbes(vjp_gram=gram, outputs=outputs, n_samples=n_rows, n_outputs=n_out,
                          n_params=sum(int(p.numel()) for p in params), kernel=kernel)


class _Capture:
    """Inputs and outputs of every ``Linear``, ``Embedding`` and ``LayerNorm`` use, by
    forward hooks; ``complete`` when these modules hold every trainable parameter, each
    parameter in one module only."""

    KINDS = ("Linear", "Embedding", "LayerNorm")

    def __init__(self, module: Any, trainable: set[str]) -> None:
        import torch

        self.uses: dict[str, list[tuple[Any, Any, Any]]] = {}
        self.handles: list[Any] = []
        covered: list[str] = []
        for name, mod in module.named_modules():
            kind = type(mod).__name__
            own = [f"{name}.{p}" if name else p for p, _ in mod.named_parameters(recurse=False)]
            if kind in self.KINDS and type(mod).forward is getattr(torch.nn, kind).forward:
                covered += [p for p in own if p in trainable]
                self.handles.append(mod.register_forward_hook(self._hook(name, mod)))
        ids = [id(p) for mod in module.modules() for p in mod.parameters(recurse=False)]
        self.complete = sorted(covered) == sorted(trainable) and len(ids) == len(set(ids))

    def _hook(self, name: str, mod: Any) -> Any:
        def hook(m: Any, args: Any, output: Any) -> None:
            self.uses.setdefault(name, []).append((mod, args[0], output))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _loss_gram(capture: _Capture, out: Any, n: int, budget: int) -> NDArray[np.float64] | None:
    """``K_ij = ∇f_i · ∇f_j`` for one output per sample from one backward pass to the
    captured layers' outputs (``G``) and their inputs (``A``): per layer, the per-sample
    gradients ``G_iᵀ A_i`` in row chunks of the weight, or the "ghost" Gram
    ``Σ (A_i A_jᵀ) ⊙ (G_i G_jᵀ)`` when that costs fewer multiply-adds."""
    import torch

    uses = [(name, u) for name, us in capture.uses.items() for u in us]
    outs = [u[2] for _, u in uses]
    grads = torch.autograd.grad(out.sum(), outs, retain_graph=True, allow_unused=True)
    k = torch.zeros((n, n), dtype=torch.float64, device=out.device)

    def add(feat: Any) -> None:  # per-sample features (n, ...) of one parameter
        f = feat.reshape(n, -1)
        k.add_((f @ f.T).to(torch.float64))

    by_module: dict[str, list[tuple[Any, Any, Any]]] = {}
    for (name, (mod, a, _)), g in zip(uses, grads):
        if g is None:
            continue
        if a.shape[0] != n or g.shape[0] != n:
            return None  # a layer whose leading axis is not the samples
        by_module.setdefault(name, []).append((mod, a, g))
    for items in by_module.values():
        mod = items[0][0]
        kind = type(mod).__name__
        parts_a = [a.reshape(n, -1, a.shape[-1]) if kind != "Embedding" else a.reshape(n, -1)
                   for _, a, _ in items]
        parts_g = [g.reshape(n, -1, g.shape[-1]) for _, _, g in items]
        # a module used more than once: its uses side by side along the positions
        a = parts_a[0] if len(items) == 1 else torch.cat(parts_a, 1)
        g = parts_g[0] if len(items) == 1 else torch.cat(parts_g, 1)
        if kind == "Embedding":
            uniq, inv = torch.unique(a, return_inverse=True)
            w = torch.zeros((n, uniq.numel(), g.shape[-1]), dtype=g.dtype, device=g.device)
            w.scatter_add_(1, inv.unsqueeze(-1).expand_as(g), g)
            if mod.weight.requires_grad:
                add(w)
            continue
        if kind == "LayerNorm":
            xhat = torch.nn.functional.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
            if mod.weight is not None and mod.weight.requires_grad:
                add((g * xhat).sum(1))
        elif mod.weight.requires_grad:
            t, di, do = a.shape[1], a.shape[2], g.shape[2]
            if n * t * t * (di + do) < t * di * do + n * di * do:  # the ghost Gram
                aa, gg = a.reshape(n * t, di), g.reshape(n * t, do)
                ghost = ((aa @ aa.T) * (gg @ gg.T)).reshape(n, t, n, t).sum((1, 3))
                k.add_(ghost.to(torch.float64))
            else:
                rows = max(1, budget // max(1, 4 * n * di * a.element_size()))
                for r0 in range(0, do, rows):
                    add(torch.einsum("ntr,ntd->nrd", g[:, :, r0:r0 + rows], a))
        if getattr(mod, "bias", None) is not None and mod.bias.requires_grad:
            add(g.sum(1))
    res: NDArray[np.float64] = k.detach().cpu().numpy()
    return res


def next_token_logits(raw: Any, inputs: Any) -> Any:
    """A causal language model's logits at every position that has a next token,
    ``(B, T − 1, V)``: the output for ``sample_axes=2`` (each position a sample, as the
    Hugging Face adapter's ``positions``); sequences without padding."""
    return raw.logits[:, :-1]


def next_token_loss(raw: Any, inputs: Any) -> Any:
    """Each sequence's mean next-token cross-entropy over its non-padded pairs of positions,
    ``(B, 1)``: the per-sample loss whose kernel is ``K_ij = ∇ℓ_i · ∇ℓ_j``."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    logp = raw.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = ((mask[:, 1:] * mask[:, :-1]) if mask is not None else ids[:, 1:] * 0 + 1).to(logp.dtype)
    return -((logp * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True))
