"""Measuring without touching training: random states, modes and gradients put back.

Frameworks are looked up in ``sys.modules`` only: a framework that is not imported has
no state to protect. JAX has no global random state (its keys are values the Recorder
never receives), so there is nothing to restore for it.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def untouched(model: Any) -> Iterator[None]:
    """Run the body and restore what a measurement could change in a training run.

    Restored afterwards: Python's and NumPy's global random states; torch's CPU and
    (initialised) CUDA generators; torch's grad mode (the body runs with gradients
    enabled); every submodule's train/eval flag and every parameter's ``.grad`` and
    ``requires_grad`` of a torch module.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch = sys.modules.get("torch")
    with contextlib.ExitStack() as stack:
        if torch is not None:
            stack.enter_context(_torch_untouched(torch, model))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _torch_untouched(torch: Any, model: Any) -> Iterator[None]:
    cpu_state = torch.random.get_rng_state()
    cuda = getattr(torch, "cuda", None)
    cuda_states = cuda.get_rng_state_all() if cuda is not None and cuda.is_initialized() else None
    modules: list[tuple[Any, bool]] = []
    params: list[tuple[Any, Any, bool]] = []
    if isinstance(model, torch.nn.Module):
        modules = [(m, m.training) for m in model.modules()]
        params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda is not None and cuda_states is not None:
            cuda.set_rng_state_all(cuda_states)
        for m, flag in modules:
            m.training = flag
        for p, grad, flag in params:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
