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
from cvcore.protocols import KernelOperator, KernelRequest, OutputSelector

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

    from cvcore.data_io import batch_size, require_samples
    from cvcore.errors import ModelError
    from cvcore.validate import require_eval

    from .setup import (
        as_inputs,
        full_precision,
        prepare_model,
        resolve_device,
        training_mode,
    )
    from .setup import probe as probe_output

    require_eval(request)
    device = resolve_device(request.device)
    dtype = torch.float64 if request.dtype == "float64" else torch.float32
    prep = prepare_model(model, dtype, device)
    if prep.scripted:
        raise ModelError("expected an nn.Module or a torch.export program for the matrix-free "
                         "operator, got a TorchScript module; use method='exact'")
    x = as_inputs(inputs, dtype, device)
    n = batch_size(x)
    require_samples(n)
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
