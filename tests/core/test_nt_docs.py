"""docs/neural-tangents.md runs: every ``python`` block, top to bottom, in one namespace;
and :mod:`cvcore.nt` (neural-tangents' names) gives the numbers of the calls it stands for."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.tolerance import rel_error

DOC = Path(__file__).resolve().parents[2] / "docs" / "neural-tangents.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_page_has_its_examples() -> None:
    assert len(blocks()) >= 10


@pytest.mark.slow
def test_every_python_block_runs() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks()):
        try:
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"{DOC.name} block {i + 1} failed: {exc!r}\n{code}") from exc


def test_the_compatibility_names() -> None:
    """``cvcore.nt`` keeps neural-tangents' signatures; each agrees with a float64
    reference from the outputs and an explicit Jacobian (a linear model, ``J = x ⊗ I``)."""
    jnp = pytest.importorskip("jax.numpy")
    from cvcore import nt

    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3)).astype(np.float32).astype(np.float64)
    x1, x2 = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))

    def f(params, x):
        return x @ params

    params = jnp.asarray(w)
    gram = x1 @ x2.T  # ∂f_c/∂W_dc' = x_d δ_cc': K = (x1·x2) ⊗ I
    ntk = nt.empirical_ntk_fn(f, dtype="float64")(x1, x2, params)
    assert ntk.shape == (3, 2) and rel_error(ntk, gram) < 1e-6
    full = nt.empirical_ntk_fn(f, trace_axes=(), dtype="float64")(x1, x2, params)
    assert rel_error(full, np.einsum("ij,cd->ijcd", gram, np.eye(3))) < 1e-6
    nngp = nt.empirical_nngp_fn(f, dtype="float64")(x1, x2, params)
    assert rel_error(nngp, (x1 @ w) @ (x2 @ w).T / 3) < 1e-6
    both = nt.empirical_kernel_fn(f, dtype="float64")(x1, x2, ("ntk", "nngp"), params)
    assert rel_error(both[0], gram) < 1e-6 and rel_error(both[1], nngp) < 1e-12
    ct = rng.normal(size=(2, 3))
    vp = nt.empirical_ntk_vp_fn(f, x1, x2, params)(ct)
    assert vp.shape == (3, 3) and rel_error(vp, gram @ ct) < 1e-5
    assert nt.predict.gradient_descent_mse is not None
    with pytest.raises(ValueError):
        nt.empirical_ntk_fn(f, implementation=7)
