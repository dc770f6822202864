"""The PyTorch backend: blocked ``torch.func`` Jacobians and one GEMM per block.

Importing this module does not import torch; every torch import is inside a function.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cvcore import outputs, progress
from cvcore.data_io import slice_inputs
from cvcore.blocking import Plan, plan_blocks
from cvcore.errors import InputError, MissingFrameworkError, ModelError, describe
from cvcore.memory import ensure_fits
from cvcore.protocols import Implementation, KernelRequest, KernelResult, OutputSelector


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingFrameworkError("torch", "torch") from None
    return torch


def resolve_device(device: str | None) -> str:
    """``device`` as given, or ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    torch = _torch()
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"expected a visible CUDA device for device={device!r}, got none")
    return str(dev)


def select_output(raw: Any, output: OutputSelector | None) -> Any:
    """Pick one tensor out of a model's raw output (see :func:`cvcore.outputs.select_output`)."""
    torch = _torch()
    return outputs.select_output(raw, output, is_leaf=lambda v: isinstance(v, torch.Tensor))


@contextlib.contextmanager
def training_mode(module: Any, train: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode, restoring each one's flag afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in saved:
            m.training = train
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Turn off TF32 for matrix products and convolutions while a kernel is measured
    (PyTorch lets cuDNN use TF32 by default, which loses float32's last 13 bits)."""
    torch = _torch()
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_tensors(inputs: Any, dtype: Any, device: str) -> Any:
    """NumPy arrays / tensors (or a dict / tuple of them) on ``device``; floating ones in ``dtype``."""
    torch = _torch()
    if isinstance(inputs, Mapping):
        return {k: to_tensors(v, dtype, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(to_tensors(v, dtype, device) for v in inputs)
    if isinstance(inputs, np.ndarray):
        if inputs.dtype == object:
            raise InputError(f"expected a numeric array as inputs, got {describe(inputs)}")
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if not isinstance(inputs, torch.Tensor):
        raise InputError(
            f"expected inputs as a tensor, a NumPy array, or a dict / tuple of them, got {describe(inputs)}"
        )
    if inputs.is_floating_point():
        return inputs.to(device=device, dtype=dtype)
    return inputs.to(device=device)


def call(module: Any, inputs: Any) -> Any:
    """Call the model the way its inputs are packed: ``m(x)``, ``m(*xs)`` or ``m(**xs)``."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def batch_of(inputs: Any) -> int:
    from cvcore.data_io import batch_size

    return batch_size(inputs)


@dataclasses.dataclass
class Prepared:
    """A model ready for ``torch.func``: the module, its trainable and constant tensors."""

    module: Any
    params: dict[str, Any]
    constants: dict[str, Any]
    scripted: bool
    #: Batch size a ``torch.export`` program was exported with, if it is static.
    export_batch: int | None = None


def prepare(model: Any, dtype: Any, device: str) -> Prepared:
    """Unwrap an exported program; split trainable parameters from everything else."""
    torch = _torch()
    export_batch = None
    if isinstance(model, torch.export.ExportedProgram):
        args, kwargs = model.example_inputs or ((), {})
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.dim() > 0]
        export_batch = int(leaves[0].shape[0]) if leaves else None
        model = model.module()
    scripted = isinstance(model, torch.jit.ScriptModule)
    if scripted:
        # TorchScript cannot take parameters from outside: measure a cast copy.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # .to() on a script module warns about .grad
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
    params: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for name, p in model.named_parameters():
        target = params if p.requires_grad else constants
        target[name] = p.detach().to(device=device, dtype=dtype if p.is_floating_point() else None)
    for name, b in model.named_buffers():
        # A copy: forwards that update buffers (batch-norm statistics) must not touch the model.
        constants[name] = b.detach().to(device=device, dtype=dtype if b.is_floating_point() else None,
                                        copy=True)
    if not params:
        raise ModelError("expected a model with trainable parameters, got none (all frozen or no parameters)")
    for name, p in params.items():
        if not torch.isfinite(p).all():
            raise ModelError(f"expected finite weights, got NaN or Inf in parameter {name!r}")
    return Prepared(module=model, params=params, constants=constants, scripted=scripted,
                    export_batch=export_batch)


def home_device(model: Any) -> str | None:
    """The device of a model's first parameter (``None`` without parameters)."""
    torch = _torch()
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return None if first is None else str(first.device)


def _is_scripted(model: Any) -> bool:
    torch = _torch()
    return isinstance(model, torch.jit.ScriptModule)


class TorchBackend:
    """Backend for ``torch.nn.Module``, ``torch.export`` programs and TorchScript modules."""

    name = "torch"
    extra = "torch"
    modules = ("torch",)

    def available(self) -> bool:
        return importlib.util.find_spec("torch") is not None

    def accepts(self, model: object) -> bool:
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        keras = sys.modules.get("keras")
        if keras is not None and isinstance(model, keras.layers.Layer):
            # A Keras 3 model on the torch backend is an nn.Module too, but
            # functional_call gives it all-zero Jacobians: the tensorflow backend
            # (Keras' stateless_call) measures it.
            return False
        return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        home = home_device(model)
        device = home if _is_scripted(model) and request.device is None and home else \
            resolve_device(request.device)
        try:
            return self._ntk(model, inputs, request, device)
        except InputError as exc:
            # A model that keeps plain (unregistered) tensors on its own device cannot run
            # elsewhere: measure it where it lives rather than on the default GPU.
            if request.device is None and home and home != device and "device" in str(exc):
                warnings.warn(f"cvcore: the model does not run on {device} ({exc}); measuring "
                              f"it on {home}, where its parameters are", stacklevel=2)
                return self._ntk(model, inputs, request, home)
            raise

    def _ntk(self, model: Any, inputs: Any, request: KernelRequest, device: str) -> KernelResult:
        torch = _torch()
        prep, x, n, n_outputs, jac, dtype = self.setup(model, inputs, request, device)
        plan = plan_blocks(n_samples=n, n_outputs=n_outputs,
                           group_sizes=[int(p.numel()) for p in prep.params.values()],
                           itemsize=torch.finfo(dtype).bits // 8, budget=request.memory_budget)
        rules: dict[str, str] = {}
        with training_mode(prep.module, request.train), full_precision():
            kernel = None
            if request.implementation != Implementation.JACOBIAN and jac is _functional_jacobian:
                from cvcore.backends.torch_structured import structured_kernel

                kernel = structured_kernel(prep, x, request, n_outputs, rules)
            if kernel is None:
                kernel = _assemble(prep, x, request, plan, jac, n_outputs, device, dtype)
        return KernelResult(kernel=kernel, n_samples=n, n_outputs=n_outputs,
                            n_params=sum(int(p.numel()) for p in prep.params.values()),
                            device=device, rules=rules)

    def setup(self, model: Any, inputs: Any, request: KernelRequest, device: str
              ) -> tuple[Prepared, Any, int, int, JacobianFn, Any]:
        """The prepared model, inputs, ``N``, ``O``, the Jacobian function and the dtype."""
        torch = _torch()
        dtype = torch.float64 if request.dtype == "float64" else torch.float32
        prep = prepare(model, dtype, device)
        x = to_tensors(inputs, dtype, device)
        n = batch_of(x)
        if n == 0:
            raise InputError("expected at least one input sample, got an empty batch")
        with training_mode(prep.module, request.train), torch.no_grad():
            # In train mode the samples of a batch interact: probe with all of them.
            probe = (self._forward(prep, x, request.output)[0] if request.train
                     else self._probe(prep, x, request.output))
        if not probe.is_floating_point():
            raise ModelError(
                f"expected a floating-point output to differentiate, got {probe.dtype} (an argmax "
                "or integer cast at the end of the forward pass has no gradient); pick another "
                "output with output="
            )
        n_outputs = int(probe.numel())
        ensure_fits(n, n_outputs, request.kernel, torch.finfo(dtype).bits // 8)
        jac: JacobianFn = _functional_jacobian
        if prep.scripted:
            jac = _scripted_jacobian
        elif prep.export_batch is not None:
            jac = _fixed_batch_jacobian
        return prep, x, n, n_outputs, jac, dtype

    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> Any:
        """Each layer's (module's) kernel: ``cvcore.protocols.LayerKernels``."""
        from cvcore.backends.torch_layers import layer_kernels

        return layer_kernels(self, model, inputs, request)

    def diagonal(self, model: Any, inputs: Any, request: KernelRequest) -> np.ndarray:
        """``K_ii`` without building the kernel: traced ``(1/O) Σ_o ‖J_io‖²`` (N values),
        full ``‖J_io‖²`` (N·O values, row ``i·O + o``); their sum is ``Tr K``."""
        from cvcore.backends.torch_trace import kernel_diagonal

        with full_precision():
            return kernel_diagonal(self, model, inputs, request)

    def operator(self, model: Any, inputs: Any, request: KernelRequest) -> Any:
        """The kernel as a matrix-free ``K @ V`` operator (``cvcore.estimate.KernelOperator``)."""
        from cvcore.backends.torch_operator import kernel_operator

        return kernel_operator(self, model, inputs, request)

    def _probe(self, prep: Prepared, x: Any, output: OutputSelector | None) -> Any:
        """One sample's output; finds out whether an exported program's batch is static."""
        first = slice_inputs(x, 0, 1)
        if prep.export_batch is None:
            return self._forward(prep, first, output)[0]
        try:
            out = self._forward(prep, first, output)[0]
        except InputError:
            # Exported with a static batch size: measure in padded blocks of that size.
            return self._forward(prep, pad_batch(first, prep.export_batch), output)[0]
        prep.export_batch = None  # the batch dimension is dynamic: the per-sample path works
        return out

    def _forward(self, prep: Prepared, x: Any, output: OutputSelector | None) -> Any:
        try:
            if prep.scripted:
                raw = call(prep.module, x)
            else:

                raw = fcall(prep.module, {**prep.constants, **prep.params}, x)
        except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
            raise InputError(
                f"expected inputs the model accepts, got {outputs.describe_inputs(x)}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        return select_output(raw, output)


def pad_batch(x: Any, size: int) -> Any:
    """Repeat the last sample until the batch has ``size`` samples."""
    torch = _torch()

    def pad(t: Any) -> Any:
        missing = size - t.shape[0]
        return t if missing <= 0 else torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])

    return torch.utils._pytree.tree_map(pad, x)


JacobianFn = Callable[[Prepared, list[str], Any, KernelRequest], Any]


def _functional_jacobian(prep: Prepared, names: list[str], x: Any, request: KernelRequest) -> Any:
    """Per-sample Jacobians of the selected output w.r.t. ``names``: (b, O, P_group)."""
    torch = _torch()
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
        if not _vmap_refusal(exc):
            raise
        # A forward with side effects (in-place buffer updates, data-dependent Python
        # control flow) or a fused kernel that writes in place (nn.GRU / nn.RNN's
        # ``_VF`` calls broadcast their hidden state in place) cannot run under
        # torch.func transforms: one sample at a time, the same meaning.
        return torch.cat([_batched_jacobian(prep, fixed, theta, slice_inputs(x, i, i + 1), output)
                          for i in range(batch_of(x))])
    return torch.cat([jac[k].reshape(jac[k].shape[0], jac[k].shape[1], -1) for k in names], dim=2)


def _vmap_refusal(exc: RuntimeError) -> bool:
    """Whether ``exc`` is ``torch.func.vmap`` refusing the forward (not a user error)."""
    text = str(exc)
    return ("mutate a captured Tensor" in text or "vmap" in text
            or "doesn't match the broadcast shape" in text)


def _batched_jacobian(prep: Prepared, fixed: dict[str, Any], theta: dict[str, Any], x: Any,
                      output: OutputSelector | None) -> Any:
    """Jacobian of one batched forward (train mode: batch statistics couple the samples,
    and the forward may update buffers in place, which ``torch.func`` transforms refuse)."""
    torch = _torch()
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    with torch.enable_grad():
        out = select_output(fcall(prep.module, {**fixed, **leaves}, x), output)
        out = out.reshape(batch_of(x), -1)
        b, o = out.shape
        eye = torch.eye(b * o, dtype=out.dtype, device=out.device).reshape(b * o, b, o)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=eye,
                                    is_grads_batched=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros(b * o, *t.shape, dtype=out.dtype,
                                                          device=out.device)).reshape(b, o, -1)
                      for g, t in zip(grads, leaves.values())], dim=2)


def fcall(module: Any, tensors: dict[str, Any], x: Any) -> Any:
    """``functional_call`` with inputs packed as ``m(x)``, ``m(*xs)`` or ``m(**xs)``."""
    from torch.func import functional_call

    if isinstance(x, Mapping):
        return functional_call(module, tensors, (), dict(x), strict=False)
    return functional_call(module, tensors, x if isinstance(x, tuple) else (x,), strict=False)


def _fixed_batch_jacobian(prep: Prepared, names: list[str], x: Any, request: KernelRequest) -> Any:
    """Jacobians for an exported program with a static batch size: pad the block to that
    size and differentiate the batched call (samples do not interact in eval mode)."""
    torch = _torch()
    from torch.func import jacrev

    size = prep.export_batch or 1
    fixed = {**prep.constants, **{k: v for k, v in prep.params.items() if k not in names}}
    n = batch_of(x)
    pieces = []
    for start in range(0, n, size):
        block = slice_inputs(x, start, min(start + size, n))
        b = batch_of(block)
        padded = pad_batch(block, size)

        def batched(th: dict[str, Any], inp: Any = padded) -> Any:
            raw = fcall(prep.module, {**fixed, **th}, inp)
            return select_output(raw, request.output).reshape(size, -1)

        jac = jacrev(batched)({k: prep.params[k] for k in names})
        pieces.append(torch.cat([jac[k].reshape(size, jac[k].shape[1], -1) for k in names], dim=2)[:b])
    return torch.cat(pieces)


def _scripted_jacobian(prep: Prepared, names: list[str], x: Any, request: KernelRequest) -> Any:
    """The slow path for TorchScript modules (``torch.func`` refuses them): one
    ``autograd.grad`` per sample and output, on the module's own parameter leaves."""
    torch = _torch()
    module = prep.module
    leaves = dict(module.named_parameters())
    wanted = [leaves[k] for k in names]
    rows = []
    for i in range(batch_of(x)):
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


def _assemble(prep: Prepared, x: Any, request: KernelRequest, plan: Plan, jac: JacobianFn,
              n_outputs: int, device: str, dtype: Any) -> Any:
    """Accumulate the kernel over parameter groups and pairs of row blocks (samples ×
    outputs), on the device; each block's Jacobian is computed in chunks of samples."""
    torch = _torch()
    names = list(prep.params)
    n = batch_of(x)
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

        def jacobian(block: Block) -> Any:
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
    _check_finite(kernel, n, width)
    return kernel.detach().cpu().numpy()


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


def _check_finite(kernel: Any, n: int, width: int) -> None:
    torch = _torch()
    diag = torch.diagonal(kernel)
    bad = ~torch.isfinite(diag)
    if bad.any():
        samples = sorted({int(i) // width for i in torch.nonzero(bad).flatten().tolist()})
        shown = ", ".join(map(str, samples[:10])) + (" ..." if len(samples) > 10 else "")
        raise ModelError(
            f"expected finite outputs and gradients, got NaN/Inf for {len(samples)} of {n} "
            f"samples (indices {shown})"
        )

