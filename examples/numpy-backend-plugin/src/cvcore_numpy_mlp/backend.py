"""The ``numpy-mlp`` backend: the class the plugin registers. It dispatches to the
engines below it (:mod:`~cvcore_numpy_mlp.jacobian` for the kernel,
:mod:`~cvcore_numpy_mlp.diagonal` for ``K_ii``), both fed by :mod:`~cvcore_numpy_mlp.setup`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cvcore.blocking import plan_blocks
from cvcore.memory import ensure_fits
from cvcore.protocols import KernelRequest, KernelResult

from cvcore_numpy_mlp.diagonal import diagonal_of
from cvcore_numpy_mlp.jacobian import assemble
from cvcore_numpy_mlp.model import Array, NumpyMLP
from cvcore_numpy_mlp.setup import prepare


class NumpyMLPBackend:
    """Backend for :class:`cvcore_numpy_mlp.NumpyMLP` models.

    ``train`` and ``implementation`` change nothing: the model has no train-mode layers
    and one way to build its kernel. There is one output array, so ``output`` must be
    ``None``; everything runs on the CPU.
    """

    name = "numpy-mlp"
    #: NumPy is always installed with cvcore, so no extra is ever needed.
    extra = ""
    #: A NumpyMLP can only exist once this package is imported.
    modules = ("cvcore_numpy_mlp",)

    def available(self) -> bool:
        return True

    def accepts(self, model: object) -> bool:
        return isinstance(model, NumpyMLP)

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        model, x = prepare(model, inputs, request)
        n, o = x.shape[0], model.n_outputs
        itemsize = x.dtype.itemsize
        ensure_fits(n, o, request.kernel, itemsize)
        plan = plan_blocks(n_samples=n, n_outputs=o,
                           group_sizes=[t.size for t in model.tensors()],
                           itemsize=itemsize, budget=request.memory_budget)
        kernel = assemble(model, x, request.kernel == "traced", plan)
        return KernelResult(kernel=kernel, n_samples=n, n_outputs=o, n_params=model.n_params,
                            device="cpu")

    def diagonal(self, model: Any, inputs: Any, request: KernelRequest) -> Array:
        """``K_ii`` without building the kernel (:func:`cvcore_numpy_mlp.diagonal.diagonal_of`)."""
        model, x = prepare(model, inputs, request)
        return np.asarray(diagonal_of(model, x, request))
