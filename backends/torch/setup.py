"""The PyTorch backend's ground floor: devices, dtypes, inputs, the prepared model, the probe.

Everything the engines above share: :func:`prepare` (a request's :class:`Setup`: the
model, its inputs, ``N`` and ``O``), :func:`prepare_model` (parameters and buffers in the
request's dtype on its device), :func:`as_inputs`, :func:`fcall` (``functional_call``),
:func:`forward` and :func:`probe` (one sample's output, and whether an exported
program's batch is static). It imports nothing else of the torch
backend, and no torch at import time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cvcore import outputs
from cvcore.data_io import batch_size, require_samples, slice_inputs
from cvcore.errors import InputError, ModelError, describe
from cvcore.imports import require
from cvcore.protocols import KernelRequest, OutputSelector

if TYPE_CHECKING:
    import torch



def resolve_device(device: str | None) -> str:
    """``device`` as given, or ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    torch = require("torch")
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
    torch = require("torch")
    return outputs.select_output(raw, output, is_leaf=lambda v: isinstance(v, torch.Tensor))


@contextlib.contextmanager
def training_mode(module: torch.nn.Module, train: bool) -> Iterator[None]:
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
    torch = require("torch")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def as_inputs(inputs: Any, dtype: torch.dtype, device: str) -> Any:
    """NumPy arrays / tensors (or a dict / tuple of them) on ``device``; floating ones in ``dtype``."""
    torch = require("torch")
    if isinstance(inputs, Mapping):
        return {k: as_inputs(v, dtype, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(as_inputs(v, dtype, device) for v in inputs)
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


def call(module: torch.nn.Module, inputs: Any) -> Any:
    """Call the model the way its inputs are packed: ``m(x)``, ``m(*xs)`` or ``m(**xs)``."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)



@dataclasses.dataclass
class Prepared:
    """A model ready for ``torch.func``: the module, its trainable and constant tensors."""

    module: torch.nn.Module
    params: dict[str, Any]
    constants: dict[str, Any]
    scripted: bool
    #: Batch size a ``torch.export`` program was exported with, if it is static.
    export_batch: int | None = None


def prepare_model(model: Any, dtype: torch.dtype, device: str) -> Prepared:
    """Unwrap an exported program; split trainable parameters from everything else."""
    torch = require("torch")
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
        if p.is_complex():  # every engine differentiates real parameters only
            raise ModelError(f"expected real floating-point parameters, got "
                             f"{str(p.dtype).removeprefix('torch.')} in {name!r}")
        if not torch.isfinite(p).all():
            raise ModelError(f"expected finite weights, got NaN or Inf in parameter {name!r}")
    return Prepared(module=model, params=params, constants=constants, scripted=scripted,
                    export_batch=export_batch)


def home_device(model: Any) -> str | None:
    """The device of a model's first parameter (``None`` without parameters)."""
    torch = require("torch")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return None if first is None else str(first.device)


def is_scripted(model: Any) -> bool:
    torch = require("torch")
    return isinstance(model, torch.jit.ScriptModule)


def pad_batch(x: Any, size: int) -> Any:
    """Repeat the last sample until the batch has ``size`` samples."""
    torch = require("torch")

    def pad(t: Any) -> Any:
        missing = size - t.shape[0]
        return t if missing <= 0 else torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])

    return torch.utils._pytree.tree_map(pad, x)


def fcall(module: torch.nn.Module, tensors: dict[str, Any], x: Any) -> Any:
    """``functional_call`` with inputs packed as ``m(x)``, ``m(*xs)`` or ``m(**xs)``."""
    from torch.func import functional_call

    if isinstance(x, Mapping):
        return functional_call(module, tensors, (), dict(x), strict=False)
    return functional_call(module, tensors, x if isinstance(x, tuple) else (x,), strict=False)


def forward(prep: Prepared, x: Any, output: OutputSelector | None) -> Any:
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


def probe(prep: Prepared, x: Any, output: OutputSelector | None) -> Any:
    """One sample's output; finds out whether an exported program's batch is static."""
    first = slice_inputs(x, 0, 1)
    if prep.export_batch is None:
        return forward(prep, first, output)[0]
    try:
        out = forward(prep, first, output)[0]
    except InputError:
        # Exported with a static batch size: measure in padded blocks of that size.
        return forward(prep, pad_batch(first, prep.export_batch), output)[0]
    prep.export_batch = None  # the batch dimension is dynamic: the per-sample path works
    return out


def bind_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...],
          defaults: dict[str, Any]) -> dict[str, Any]:
    """``args`` and ``kwargs`` bound to ``names`` over ``defaults`` (a functional call's
    arguments by name)."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


@dataclasses.dataclass
class Setup:
    """A model and its inputs ready to measure (what :func:`prepare` returns).

    Attributes:
        prep: the prepared model (:class:`Prepared`) in ``dtype`` on ``device``.
        x: the inputs, on ``device``, floating ones in ``dtype``.
        n: samples ``N``; ``n_outputs``: outputs per sample ``O``.
        dtype: the ``torch.dtype`` of the computation; ``device``: where it runs.
    """

    prep: Prepared
    x: Any
    n: int
    n_outputs: int
    dtype: torch.dtype
    device: str

    @property
    def itemsize(self) -> int:
        """Bytes per number in the computation's dtype."""
        torch = require("torch")
        return int(torch.finfo(self.dtype).bits // 8)


def prepare(model: Any, inputs: Any, request: KernelRequest, device: str) -> Setup:
    """The model and inputs for ``request`` on ``device``, ``N`` and ``O`` (one sample's
    forward pass; in train mode all samples', whose batch statistics couple them)."""
    torch = require("torch")
    dtype = torch.float64 if request.dtype == "float64" else torch.float32
    prep = prepare_model(model, dtype, device)
    x = as_inputs(inputs, dtype, device)
    n = batch_size(x)
    require_samples(n)
    with training_mode(prep.module, request.train), torch.no_grad():
        probed = (forward(prep, x, request.output)[0] if request.train
                  else probe(prep, x, request.output))
    if not probed.is_floating_point():
        raise ModelError(
            f"expected a floating-point output to differentiate, got {probed.dtype} (an argmax "
            "or integer cast at the end of the forward pass has no gradient); pick another "
            "output with output="
        )
    return Setup(prep=prep, x=x, n=n, n_outputs=int(probed.numel()), dtype=dtype, device=device)


def batch_first_model(model: Any, in_axes: Any, out_axis: int) -> Any:
    """``model`` wrapped to take batch-first inputs and return a batch-first output, for
    a model whose batch axes are ``in_axes`` (an int, or one per member of tuple / dict
    inputs) and ``out_axis`` (neural-tangents' ``vmap_axes``, :mod:`cvcore.batch_axes`)."""
    torch = require("torch")

    def back(t: Any, axis: Any) -> Any:
        return t if axis in (0, None) or not isinstance(t, torch.Tensor) else t.movedim(0, int(axis))

    class BatchFirst(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs:
                named = in_axes if isinstance(in_axes, Mapping) else dict.fromkeys(kwargs, in_axes)
                out = self.inner(**{k: back(v, named.get(k, 0)) for k, v in kwargs.items()})
            else:
                each = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
                out = self.inner(*(back(v, a) for v, a in zip(args, each)))
            return out.movedim(out_axis, 0)

    return BatchFirst(model)
