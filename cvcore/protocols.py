"""The contracts a plugin fulfils: backends, their optional capabilities, loaders, adapters.

A backend implements :class:`Backend`; each optional capability is a Protocol of its
own: :class:`DiagonalBackend` (``K_ii`` without the kernel), :class:`OperatorBackend`
(the kernel as a matrix-free :class:`KernelOperator`), :class:`PerLayerBackend` (the
kernel split by layer) and :class:`OutputsBackend` (the outputs ``f(x)`` the kernel
differentiates); and the framework chores the core must never do itself:
:class:`SeedingBackend`, :class:`GuardingBackend`, :class:`CountingBackend`,
:class:`TakingBackend` and :class:`ArrayBackend` (the core has a NumPy default for each,
:mod:`cvcore.capabilities`). mypy checks every built-in backend class against each Protocol
it implements (``tests/typecheck_backends.py``, part of ``make lint``); a third-party
backend can run :func:`cvcore.testing.run_backend_conformance` to check its behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

KernelKind = Literal["traced", "full"]
#: How to pick one output from a model returning several: an index, a key or attribute
#: name, or a callable applied to the raw output.
OutputSelector = int | str | Callable[[Any], Any]

#: Default memory budget for Jacobian blocks when nothing else is known: 1 GiB.
DEFAULT_MEMORY_BUDGET = 1 << 30


class Implementation(str, Enum):
    """How a backend builds the kernel.

    JACOBIAN: blocked per-sample Jacobians ``J`` (samples × outputs × parameters) and
        one matrix product ``J Jᵀ`` per pair of blocks. Works for every model; memory is
        one block's Jacobian, bounded by the memory budget.
    STRUCTURED: per-layer identities (a dense layer's kernel is ``(A Aᵀ) ⊙ (G Gᵀ)``,
        inputs times output-gradients) that never form the Jacobian; layers without a
        rule fall back to the Jacobian path. PyTorch finds layers by the calls a module
        makes, JAX in the jaxpr (Keras on JAX included); Keras on TensorFlow or torch
        and tf.Module have the Jacobian path only.
    AUTO (default): per layer, the cheaper of the two by a FLOP and memory estimate.
    """

    AUTO = "auto"
    JACOBIAN = "jacobian"
    STRUCTURED = "structured"


@dataclass(frozen=True)
class KernelRequest:
    """Everything a backend needs to know to build a kernel (same names everywhere).

    Attributes:
        kernel: ``"traced"`` (N × N, averaged over outputs) or ``"full"`` (N·O × N·O,
            row ``i·O + o``).
        output: which output to use when the model returns several.
        dtype: ``"float32"`` or ``"float64"``; the precision of the whole computation.
        device: framework device string (``"cpu"``, ``"cuda:1"``); ``None`` picks the
            accelerator when one is visible.
        train: measure in training mode (dropout, batch statistics) instead of eval mode.
        memory_budget: bytes one Jacobian block may use.
        implementation: see :class:`Implementation`.
        family: the model family whose adapter shapes the call (``"language"``,
            ``"graph"``, ``"autoencoder"``, ``"rl"``, or ``"none"`` for no adapter);
            ``None`` chooses it from the model's type. Backends never read it.
        verify: compare the kernel with the generic Jacobian path on a few samples
            (see :mod:`cvcore.verify`).
    """

    kernel: KernelKind = "traced"
    output: OutputSelector | None = None
    dtype: Literal["float32", "float64"] = "float32"
    device: str | None = None
    train: bool = False
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    implementation: Implementation = Implementation.AUTO
    family: str | None = None
    verify: bool = False


@dataclass(frozen=True)
class KernelResult:
    """What a backend hands back: the kernel as NumPy and what it was built from."""

    kernel: NDArray[np.floating[Any]]
    n_samples: int
    n_outputs: int
    n_params: int
    device: str = "cpu"
    #: parameters a layer rule measured (name -> rule), for messages; empty when every
    #: parameter went through the generic Jacobian path or the backend does not say
    rules: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A framework backend: turns (model, inputs) into an NTK as a NumPy array.

    Attributes:
        name: short unique name, used by ``backend=`` and ``--backend``.
        extra: the ``cvcore[...]`` extra that installs its framework.
        modules: top-level module names of its framework; a model is only offered to
            the backend when one of them is already in ``sys.modules``.

    Optional: ``install`` (a whole ``pip install ...`` command, for third-party backends
    whose framework is not a cvcore extra), and the capabilities :class:`DiagonalBackend`,
    :class:`OperatorBackend` and :class:`PerLayerBackend`.
    """

    name: str
    extra: str
    modules: tuple[str, ...]

    def available(self) -> bool:
        """Whether the framework is installed (without importing it)."""
        ...

    def accepts(self, model: object) -> bool:
        """Whether this backend can measure ``model`` (an ``isinstance`` test)."""
        ...

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        """Build the kernel of ``model`` on ``inputs`` as ``request`` says."""
        ...


#: ``K @ V`` for float64 ``V`` of shape ``(dim, k)`` (or ``(dim,)``).
MatVec = Callable[[NDArray[np.float64]], NDArray[np.float64]]


@dataclass(frozen=True)
class KernelOperator:
    """A kernel as a matrix-free operator, what a backend's ``operator`` returns.

    Attributes:
        matvec: ``K @ V`` for float64 ``V`` of shape ``(dim, k)`` (or ``(dim,)``).
        dim: ``D``: ``N`` (traced) or ``N·O`` (full, row ``i·O + o``).
        n_samples: ``N``.
        n_outputs: ``O``.
        n_params: trainable parameters ``P``, when the backend knows it.
    """

    matvec: MatVec
    dim: int
    n_samples: int
    n_outputs: int
    n_params: int | None = None


#: ``(A, S) -> G``: ``A`` ``(m, N, k)`` and ``S`` ``(m, O, k)`` float64 give ``m`` cotangents
#: ``Z_j = A_j S_jᵀ`` (``N × O``, row ``i`` the sample, column ``o`` the output); ``G`` is the
#: ``m × m`` float64 Gram matrix ``G_jl = (Jᵀ vec Z_j) · (Jᵀ vec Z_l)`` of their
#: vector-Jacobian products.
VjpGram = Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]]


@dataclass(frozen=True)
class JacobianProbes:
    """A model's output Jacobian reached through vector-Jacobian products only, what a
    backend's ``probes`` returns (:mod:`cvcore.estimators.alignment`).

    Attributes:
        vjp_gram: the Gram matrix of the products of ``m`` low-rank cotangents (:data:`VjpGram`).
        outputs: the outputs ``f(X)`` as NumPy ``(N, O)`` (the model's dtype).
        n_samples: ``N``.
        n_outputs: ``O``.
        n_params: trainable parameters ``P``, when the backend knows it.
        kernel: the exact ``N × N`` kernel of a one-output model from the same forward
            pass (e.g. a per-sample loss), ``None`` where the backend cannot (then
            :func:`cvcore.plan.build_kernel` forms it); itself ``None`` when not offered.
    """

    vjp_gram: VjpGram
    outputs: Callable[[], NDArray[Any]]
    n_samples: int
    n_outputs: int
    n_params: int | None = None
    kernel: Callable[[], NDArray[np.float64] | None] | None = None


@runtime_checkable
class ProbeBackend(Protocol):
    """An optional backend capability: vector-Jacobian products of the outputs, for the
    trace and the alignments of kernels too large to form (``cvcore.estimate``)."""

    def probes(self, model: Any, inputs: Any, request: KernelRequest, sample_axes: int = 1
               ) -> JacobianProbes:
        """The output Jacobian of ``model`` on ``inputs`` as :class:`JacobianProbes`;
        ``sample_axes=2``: the output is ``(B, S, O)`` and each of the ``B·S`` rows is a
        sample (a language model's token positions)."""
        ...


@runtime_checkable
class DiagonalBackend(Protocol):
    """An optional backend capability: the kernel's diagonal without forming the kernel
    (``variables=("trace", ...)`` and the trace of the stochastic estimates)."""

    def diagonal(self, model: Any, inputs: Any, request: KernelRequest
                 ) -> NDArray[np.floating[Any]]:
        """``K_ii`` as NumPy in the request's dtype: traced ``(1/O) Σ_o ‖J_io‖²`` (``N``
        values), full ``‖J_io‖²`` (``N·O`` values, row ``i·O + o``); their sum is ``Tr K``."""
        ...


@runtime_checkable
class OperatorBackend(Protocol):
    """An optional backend capability: the kernel as a matrix-free ``K @ V`` operator
    (stochastic estimates, ``method="stochastic"``)."""

    def operator(self, model: Any, inputs: Any, request: KernelRequest) -> KernelOperator:
        """The kernel of ``model`` on ``inputs`` as :class:`KernelOperator`, never formed."""
        ...


#: One parameter group's per-sample Jacobians, one array per input set, each
#: ``(N_s, *S, P_group)`` (``S`` the per-sample output shape), what
#: :meth:`JacobianBackend.jacobians` yields.
JacobianGroup = tuple[NDArray[np.floating[Any]], ...]


@runtime_checkable
class BatchAxesBackend(Protocol):
    """An optional backend capability: a model wrapped to take and return batch-first
    arrays, for a model whose batch axes are elsewhere (neural-tangents' ``vmap_axes``,
    :mod:`cvcore.batch_axes`)."""

    def batch_first_model(self, model: Any, in_axes: Any, out_axis: int) -> Any:
        """``model`` taking batch-first inputs (``in_axes``: where its own inputs keep the
        batch, an int or one per member) and returning its output with the batch first."""
        ...


@runtime_checkable
class NamingBackend(Protocol):
    """An optional backend capability: the framework a model is in, in words, when the
    backend's name does not say it (a Keras 3 model runs on TensorFlow, JAX or torch)."""

    def framework(self, model: Any) -> str:
        """E.g. ``"keras/jax"``; stored as a run's ``framework``."""
        ...


@runtime_checkable
class JacobianBackend(Protocol):
    """An optional backend capability: per-sample Jacobians of one or more input sets,
    one parameter group at a time (cross kernels ``K(x₁, x₂)``, kernels with any traced
    or diagonal output axes, :mod:`cvcore.cross`). Summing the contraction over the
    groups gives the whole kernel; each group's Jacobians fit the request's memory budget."""

    def jacobians(self, model: Any, input_sets: tuple[Any, ...], request: KernelRequest
                  ) -> Iterator[JacobianGroup]:
        """Per group, one ``(N_s, *S, P_group)`` array per input set, in the request's
        dtype (eval mode only when there are several input sets)."""
        ...

    def output_shape(self, model: Any, inputs: Any, request: KernelRequest) -> tuple[int, ...]:
        """One sample's output shape ``S`` (the output ``request.output`` selects), from
        one forward pass (the whole batch's under ``train=True``, without its first axis)."""
        ...


@dataclass(frozen=True)
class LayerKernel:
    """One layer's share ``K_l = J_l J_lᵀ`` of the kernel (``K = Σ_l K_l``).

    Attributes:
        name: the layer's path in the user's model, parts joined by ``.`` (``block.fc``;
            ``(root)`` for parameters at the top level), the same rule on every backend.
        n_params: trainable scalars in the layer.
        kernel: its kernel, in the request's convention, as NumPy.
    """

    name: str
    n_params: int
    kernel: NDArray[np.floating[Any]]


@dataclass(frozen=True)
class LayerKernels:
    """What :class:`PerLayerBackend.layer_kernels` returns: every layer's kernel, in model
    order, and the shape facts of the whole kernel (their sum)."""

    layers: tuple[LayerKernel, ...]
    n_samples: int
    n_outputs: int
    device: str = "cpu"


@runtime_checkable
class PerLayerBackend(Protocol):
    """An optional backend capability: the kernel split by layer (``per_layer=True``).

    Backends only return the kernels; every variable is computed by the core
    (:func:`cvcore.spectrum.layer_variables`).
    """

    def layer_kernels(self, model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
        """Each layer's kernel ``J_l J_lᵀ``, for the same request :meth:`Backend.ntk` takes."""
        ...


@runtime_checkable
class OutputsBackend(Protocol):
    """An optional backend capability: the model's outputs ``f(x)`` at the probe inputs, the
    ones its kernel differentiates (the residual ``f(x) − y`` of ``measure(..., targets=)``,
    the NNGP of the outputs)."""

    def outputs(self, model: Any, inputs: Any, request: KernelRequest) -> NDArray[np.floating[Any]]:
        """``(N, O)`` NumPy in the request's dtype: the output ``request.output`` selects,
        flattened per sample (column ``o`` is the kernel's output ``o``), in the kernel's mode:
        each sample alone in eval mode, the whole probe as one batch under ``train=True``."""
        ...


@runtime_checkable
class SeedingBackend(Protocol):
    """An optional backend capability: seed the framework's global random generators
    (dropout under ``train=True``), so the same seed draws the same masks in every run.

    The core calls it on every registered backend whose framework is already imported
    (:func:`cvcore.capabilities.seed_frameworks`); it must never import a framework.
    """

    def seed(self, seed: int) -> None:
        """Seed the framework's generators with ``seed`` (if the framework is imported)."""
        ...


@runtime_checkable
class GuardingBackend(Protocol):
    """An optional backend capability: put back what a measurement could change in a
    training run (the framework's random state, grad mode, train/eval flags, ``.grad``).

    The Recorder enters it for every registered backend whose framework is imported
    (:func:`cvcore.capabilities.untouched`); Python's and NumPy's random states are put
    back by the core itself.
    """

    def guard(self, model: Any) -> AbstractContextManager[None]:
        """A context manager that restores the framework's state on exit."""
        ...


@runtime_checkable
class CountingBackend(Protocol):
    """An optional backend capability: the model's trainable parameters, told cheaply
    (without building anything), or ``None`` when it cannot be told."""

    def count_parameters(self, model: Any) -> int | None:
        """The number of trainable scalars of ``model``, or ``None``."""
        ...


@runtime_checkable
class TakingBackend(Protocol):
    """An optional backend capability: rows of a framework tensor
    (:func:`cvcore.data_io.take` handles NumPy arrays, dicts and tuples itself)."""

    def take(self, inputs: Any, index: NDArray[np.int64]) -> Any:
        """The samples ``index`` (along the first axis) of one framework tensor."""
        ...


@runtime_checkable
class ArrayBackend(Protocol):
    """An optional backend capability: a NumPy array as an array of the framework
    (the sketch's projection matrix multiplies the model's outputs inside the backend)."""

    def as_array(self, values: NDArray[Any], like: Any) -> Any:
        """``values`` as an array of ``like``'s framework, dtype and device."""
        ...


def layer_of(path: str, separator: str = ".") -> str:
    """The layer a parameter belongs to: its path without the last component.

    >>> layer_of("encoder.0.weight"), layer_of("scale"), layer_of("dense/kernel", "/")
    ('encoder.0', '(root)', 'dense')
    """
    head, sep, _ = path.rpartition(separator)
    return head if sep and head else "(root)"


@dataclass
class LoadedModel:
    """A model read from a checkpoint, ready for a backend."""

    model: Any
    backend: str | None = None
    example_inputs: Any = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadOptions:
    """Options the CLI passes to checkpoint loaders."""

    model_factory: str | None = None
    trust: bool = False
    key: str | None = None
    #: Longest token sequence kept when texts are tokenized (``None``: the model's limit).
    max_length: int | None = None
    #: Keyword arguments for the ``model_factory`` call (``--model-args`` JSON).
    model_args: dict[str, Any] | None = None


@runtime_checkable
class CheckpointLoader(Protocol):
    """Reads a model from a checkpoint file or directory.

    Optional: ``prefers(path, options) -> bool``, asked before any content test, for a
    loader that must read a file another loader's content test also matches (the
    Hugging Face loader for a safetensors file with ``--model transformers:Class``).

    Attributes:
        kind: always ``"checkpoint"``.
        name: short unique name.
        extra: the ``cvcore[...]`` extra its framework needs.
        extensions: file extensions it claims when the content test is not decisive.
    """

    kind: Literal["checkpoint"]
    name: str
    extra: str
    extensions: tuple[str, ...]

    def available(self) -> bool:
        """Whether its framework is installed (without importing it)."""
        ...

    def sniff(self, path: Path) -> bool:
        """Whether the file's content is in this loader's format (reads a few bytes)."""
        ...

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        """Read the checkpoint."""
        ...


@runtime_checkable
class DataLoader(Protocol):
    """Reads probe inputs: a file format or a named bundled dataset."""

    kind: Literal["data"]
    name: str

    def claims(self, spec: str) -> bool:
        """Whether ``spec`` (a path or a dataset name) is this loader's."""
        ...

    def load(self, spec: str, key: str | None) -> Any:
        """Return the inputs (NumPy array, framework tensor, or a dict/tuple of them)."""
        ...


@runtime_checkable
class Adapter(Protocol):
    """Shapes a model family's call so a backend can measure it.

    ``adapt`` returns the model, inputs and output selector to hand to the backend
    (for example a Hugging Face model's ``logits`` field).

    Optional: ``family`` (the name ``family=`` / ``--family`` selects, default ``name``);
    ``library`` (the module it needs, shown by ``cv backends``) and ``extra``;
    ``expects`` (the models it takes, in words, for errors); ``accepts_family(model)``
    (whether it can measure ``model`` when its family is named, for models its type alone
    does not reveal; default ``accepts``); ``heads(model)`` (the outputs measured side by
    side, one kernel each, when no output is chosen, such as an actor-critic's
    ``("actor", "critic")``); ``describe(model, inputs, output)`` (what is measured, in
    words, echoed in every output's metadata).
    """

    name: str

    def accepts(self, model: object) -> bool:
        """Whether the model belongs to this adapter's family."""
        ...

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        """Return ``(model, inputs, output)`` for the backend."""
        ...
