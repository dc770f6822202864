"""The benchmark's JAX and TensorFlow ports compute the torch models' functions and NTKs.

benchmarks/run.py compares peers on ports of its five torch models
(benchmarks/jax_models.py, benchmarks/tf_models.py); these checks, in float64 on three
samples, are what makes its rel.err column a comparison of one function's kernel.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import run

from tests.tolerance import rel_error as rel

N = 2
TOL = 1e-10


@functools.cache
def torch_case(name: str) -> tuple[run.Case, np.ndarray, np.ndarray]:
    """The float64 torch model on ``N`` inputs, its outputs and its torch.func NTK."""
    import torch

    model, inputs = run.make_model(name)
    case = run.Case(name, model.double(), inputs(N).double(), "full", "cpu")
    with torch.no_grad():
        outputs = case.model(case.x).numpy()
    return case, outputs, run.torchfunc_kernel(case)()


@contextlib.contextmanager
def jax_x64() -> Iterator[None]:
    """JAX in float64 for the block (``jax.enable_x64``, or the experimental one)."""
    import jax

    ctx = jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()
    with ctx:
        yield


@pytest.mark.parametrize("name", run.MODELS)
def test_jax_port_matches_torch(name: str) -> None:
    jax = pytest.importorskip("jax")
    from jax_models import port

    case, outputs, kernel = torch_case(name)
    apply_fn, params = port(name, case.state())
    with jax_x64():
        out = jax.jit(apply_fn)(params, case.inputs())  # jit: eager dispatch is slower here
        assert out.dtype == np.float64
        assert rel(out, outputs) <= TOL
        assert rel(run.jax_kernel(case)(), kernel) <= TOL


@pytest.mark.parametrize("name", run.MODELS)
def test_tf_port_matches_torch(name: str) -> None:
    tf = pytest.importorskip("tensorflow")
    from tf_models import port

    case, outputs, kernel = torch_case(name)
    apply_fn, params = port(name, case.state())
    out = apply_fn(params, tf.constant(case.inputs())).numpy()
    assert out.dtype == np.float64
    assert rel(out, outputs) <= TOL
    assert rel(run.tf_kernel(case)(), kernel) <= TOL
