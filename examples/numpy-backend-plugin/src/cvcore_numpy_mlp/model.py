"""A multilayer perceptron in plain NumPy, with hand-written per-sample Jacobians.

``f(x) = W_L h_{L-1} + b_L`` with ``h_l = tanh(W_l h_{l-1} + b_l)`` and ``h_0 = x``. The
parameters, in order, are ``W_1, b_1, …, W_L, b_L``; a weight ``W`` of shape (out, in) is
flattened row-major, so ``W[p, q]`` is entry ``p·in + q`` of its block.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cvcore.errors import InputError, ModelError, describe
from numpy.typing import NDArray

#: Name of the marker array that identifies this package's ``.npz`` checkpoints; its
#: value is the format version.
MARKER = "__cvcore_numpy_mlp__"
FORMAT_VERSION = 1

Array = NDArray[Any]


@dataclass(frozen=True)
class NumpyMLP:
    """A tanh MLP with a linear output layer.

    Attributes:
        layers: ``(W, b)`` per layer, ``W`` of shape (out, in) and ``b`` of shape (out,).

    >>> model = NumpyMLP.random([3, 4, 2], seed=0)
    >>> model.n_inputs, model.n_outputs, model.n_params
    (3, 2, 26)
    >>> model.forward(np.zeros((5, 3))).shape
    (5, 2)
    """

    layers: tuple[tuple[Array, Array], ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ModelError("expected an MLP with at least one layer, got none")
        width = None
        for index, (w, b) in enumerate(self.layers):
            if np.ndim(w) != 2 or np.ndim(b) != 1 or np.shape(b)[0] != np.shape(w)[0]:
                raise ModelError(f"expected layer {index} as W (out, in) and b (out,), got "
                                 f"W {np.shape(w)} and b {np.shape(b)}")
            if width is not None and np.shape(w)[1] != width:
                raise ModelError(f"expected layer {index} to take {width} inputs (the previous "
                                 f"layer's outputs), got W of shape {np.shape(w)}")
            width = np.shape(w)[0]

    @classmethod
    def random(cls, sizes: Sequence[int], seed: int = 0) -> NumpyMLP:
        """An MLP with layer widths ``sizes`` (inputs first), LeCun-normal weights and
        small random biases."""
        if len(sizes) < 2:
            raise ModelError(f"expected at least two sizes (inputs, outputs), got {list(sizes)}")
        rng = np.random.default_rng(seed)
        layers = tuple(
            (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), 0.1 * rng.normal(size=n_out))
            for n_in, n_out in itertools.pairwise(sizes)
        )
        return cls(layers)

    @property
    def n_inputs(self) -> int:
        """Features per sample."""
        return int(self.layers[0][0].shape[1])

    @property
    def n_outputs(self) -> int:
        """O, outputs per sample."""
        return int(self.layers[-1][0].shape[0])

    @property
    def n_params(self) -> int:
        """P, the number of parameters."""
        return sum(int(w.size + b.size) for w, b in self.layers)

    def tensors(self, dtype: Any = np.float64) -> list[Array]:
        """The parameter tensors ``[W_1, b_1, …, W_L, b_L]`` in ``dtype``."""
        return [t.astype(dtype) for layer in self.layers for t in layer]

    def flat_params(self) -> NDArray[np.float64]:
        """Every parameter as one float64 vector, in the order of :meth:`tensors`."""
        return np.concatenate([t.ravel() for t in self.tensors()])

    def with_params(self, flat: Array) -> NumpyMLP:
        """A copy with the parameters taken from a flat vector (float64)."""
        flat = np.asarray(flat, dtype=np.float64).ravel()
        if flat.size != self.n_params:
            raise InputError(f"expected {self.n_params} parameters, got {flat.size}")
        layers, start = [], 0
        for w, b in self.layers:
            new_w = flat[start:start + w.size].reshape(w.shape)
            start += w.size
            layers.append((new_w, flat[start:start + b.size].copy()))
            start += b.size
        return NumpyMLP(tuple(layers))

    def forward(self, x: Array) -> Array:
        """Outputs ``(N, O)`` for inputs ``(N, n_inputs)``, in the inputs' float dtype."""
        return self._activations(x)[-1]

    def _activations(self, x: Array) -> list[Array]:
        """``[h_0 = x, h_1, …, h_{L-1}, f]``: each layer's input, then the output."""
        out = [x]
        for index, (w, b) in enumerate(self.layers):
            z = out[-1] @ w.T.astype(x.dtype) + b.astype(x.dtype)
            out.append(z if index == len(self.layers) - 1 else np.tanh(z))
        return out

    def output_gradients(self, x: Array) -> tuple[list[Array], list[Array]]:
        """Backpropagation of every output at once.

        Returns:
            ``(inputs, grads)``: ``inputs[l]`` is layer ``l``'s input ``(N, in_l)`` and
            ``grads[l]`` is ``∂f_o/∂z_l`` of shape ``(N, O, out_l)``, ``z_l`` being the
            layer's pre-activation.
        """
        acts = self._activations(x)
        n, o = x.shape[0], self.n_outputs
        grad = np.broadcast_to(np.eye(o, dtype=x.dtype), (n, o, o))
        grads: list[Array] = [grad] * len(self.layers)
        for index in range(len(self.layers) - 1, -1, -1):
            grads[index] = grad
            if index > 0:
                w = self.layers[index][0].astype(x.dtype)
                h = acts[index]  # tanh output of the layer below
                grad = (grad @ w) * (1 - h * h)[:, None, :]
        return acts[:-1], grads

    def jacobian(self, x: Array, members: Sequence[int]) -> Array:
        """Per-sample Jacobian of the outputs w.r.t. the tensors ``members`` (indices into
        :meth:`tensors`): shape ``(N, O, Σ sizes)``, in ``x``'s dtype."""
        inputs, grads = self.output_gradients(x)
        n, o = x.shape[0], self.n_outputs
        pieces = []
        for t in members:
            layer, is_bias = divmod(t, 2)
            g = grads[layer]
            if is_bias:
                pieces.append(np.ascontiguousarray(g))
            else:
                pieces.append((g[:, :, :, None] * inputs[layer][:, None, None, :]).reshape(n, o, -1))
        return np.concatenate(pieces, axis=2)

    def save(self, path: str | Path) -> None:
        """Write the model as an ``.npz`` checkpoint with the :data:`MARKER` array."""
        arrays: dict[str, Array] = {MARKER: np.array(FORMAT_VERSION)}
        for index, (w, b) in enumerate(self.layers):
            arrays[f"W{index}"] = np.asarray(w)
            arrays[f"b{index}"] = np.asarray(b)
        with open(path, "wb") as fh:  # a file object: np.savez must not append ".npz"
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> NumpyMLP:
        """Read a checkpoint written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: np.asarray(archive[k]) for k in archive.files}
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{path}: expected a readable .npz archive, got {exc}") from None
        version = arrays.pop(MARKER, None)
        if version is None or version.shape != () or int(version) != FORMAT_VERSION:
            raise InputError(f"{path}: expected a {MARKER} marker with format version "
                             f"{FORMAT_VERSION}, got {None if version is None else describe(version)}")
        try:
            return cls(_layers_from(arrays, path))
        except ModelError as exc:
            raise InputError(f"{path}: {exc}") from None


def _layers_from(arrays: dict[str, Array], path: str | Path) -> tuple[tuple[Array, Array], ...]:
    count = len(arrays) // 2
    expected = {f"{kind}{i}" for i in range(count) for kind in "Wb"}
    if set(arrays) != expected or count == 0:
        raise InputError(f"{path}: expected arrays {sorted(expected) or ['W0', 'b0']} beside the "
                         f"marker, got {sorted(arrays)}")
    layers = []
    for i in range(count):
        w, b = arrays[f"W{i}"], arrays[f"b{i}"]
        if w.dtype.kind != "f" or b.dtype.kind != "f":
            raise InputError(f"{path}: expected floating-point weights, got W{i} {w.dtype} "
                             f"and b{i} {b.dtype}")
        layers.append((w, b))
    return tuple(layers)
