"""Plugin registry: lazy loading, inline fake plugins, backend choice, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import cvcore
from cvcore import plugins
from cvcore.errors import BackendError, MissingFrameworkError
from cvcore.hookspecs import hookimpl
from cvcore.protocols import Backend, KernelRequest, KernelResult


class LinearModel:
    """f(x) = W x with W the parameters: J_{i,o} = x_i ⊗ e_o, so K_traced = X Xᵀ / ... ."""

    def __init__(self, n_out: int) -> None:
        self.n_out = n_out


class FakeBackend:
    name = "fake"
    extra = "fake"
    modules = ("numpy",)
    calls: ClassVar[list[KernelRequest]] = []

    def available(self) -> bool:
        return True

    def accepts(self, model: object) -> bool:
        return isinstance(model, LinearModel)

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        self.calls.append(request)
        x = np.asarray(inputs, dtype=np.float64)
        gram = x @ x.T  # for f_o = w_o · x, J_{i,o} · J_{j,o'} = (x_i · x_j) δ_{oo'}
        o = model.n_out
        kernel = gram if request.kernel == "traced" else np.kron(gram, np.eye(o))
        return KernelResult(kernel=kernel, n_samples=x.shape[0], n_outputs=o,
                            n_params=x.shape[1] * o)


class FakePlugin:
    @hookimpl
    def cvcore_register_backends(self, register: Any) -> None:
        register(FakeBackend())


@pytest.fixture
def fake_plugin():
    plugin = FakePlugin()
    plugins.register(plugin, name="fake-plugin")
    yield plugin
    plugins.unregister(plugin)


def test_fake_backend_registers_and_unregisters(fake_plugin: FakePlugin) -> None:
    assert "fake" in plugins.registry().backends
    assert isinstance(plugins.registry().backends["fake"], Backend)
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    k = cvcore.ntk(LinearModel(3), x)
    np.testing.assert_allclose(k, [[1, 1, 0], [1, 2, 2], [0, 2, 4]])
    full = cvcore.ntk(LinearModel(3), x, kernel="full")
    assert full.shape == (9, 9)
    cv = cvcore.measure(LinearModel(3), x)
    # Eigenvalues of [[1,1,0],[1,2,2],[0,2,4]] sum to the trace 7.
    assert cv.trace == pytest.approx(7.0)
    plugins.unregister(fake_plugin)
    try:
        assert "fake" not in plugins.registry().backends
        with pytest.raises(BackendError, match="LinearModel"):
            cvcore.ntk(LinearModel(3), x)
    finally:
        plugins.register(fake_plugin, name="fake-plugin")


def test_named_backend_and_options_reach_it(fake_plugin: FakePlugin) -> None:
    FakeBackend.calls.clear()
    cvcore.ntk(LinearModel(2), np.eye(2), backend="fake", dtype="float64", memory_budget="1MB")
    req = FakeBackend.calls[-1]
    assert (req.dtype, req.memory_budget, req.kernel) == ("float64", 1 << 20, "traced")
    with pytest.raises(BackendError, match="expected a backend name among"):
        cvcore.ntk(LinearModel(2), np.eye(2), backend="nope")


def test_bad_options_are_refused_before_the_backend(fake_plugin: FakePlugin) -> None:
    with pytest.raises(cvcore.InputError, match="kernel 'traced' or 'full'"):
        cvcore.ntk(LinearModel(2), np.eye(2), kernel="diag")
    with pytest.raises(cvcore.InputError, match="float32' or 'float64'"):
        cvcore.ntk(LinearModel(2), np.eye(2), dtype="int8")
    with pytest.raises(cvcore.InputError, match="implementation"):
        cvcore.ntk(LinearModel(2), np.eye(2), implementation="magic")


def test_missing_framework_names_install_command(fake_plugin: FakePlugin,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeBackend, "available", lambda self: False)
    with pytest.raises(MissingFrameworkError, match=r"pip install 'cvcore\[fake\]'"):
        plugins.get_backend("fake")


def test_builtin_plugins_register_through_entry_points() -> None:
    reg = plugins.registry()
    assert "torch" in reg.backends
    assert {"numpy", "bundled"} <= set(reg.data_loaders)
    assert {"torch-save", "torch-export", "safetensors"} <= set(reg.checkpoint_loaders)
    names = {name for name, _ in plugins.manager().list_name_plugin()}
    assert {"data_loaders", "torch"} <= names


def run_fresh(code: str, **env: str) -> Any:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_listing_plugins_import_no_framework() -> None:
    code = (
        "import sys, json, cvcore\n"
        "from cvcore import plugins\n"
        "reg = plugins.registry()\n"
        "[b.available() for b in reg.backends.values()]\n"
        "from cvcore.cli.app import make_app; make_app()\n"
        "print(json.dumps([m for m in ('torch', 'tensorflow', 'jax', 'keras') if m in sys.modules]))"
    )
    assert run_fresh(code) == []


def test_cvcore_plugins_env_restricts_entry_points() -> None:
    code = ("import json; from cvcore import plugins; "
            "print(json.dumps(sorted(plugins.registry().backends)))")
    assert run_fresh(code, CVCORE_PLUGINS="data_loaders") == []
    assert "torch" in run_fresh(code, CVCORE_PLUGINS="torch,data_loaders")


def test_folders_install_inside_the_package() -> None:
    import cvcore.adapters
    import cvcore.backends
    import cvcore.cli

    root = Path(__file__).resolve().parents[2]
    assert Path(cvcore.backends.__file__).parent == root / "backends"
    assert Path(cvcore.cli.__file__).parent == root / "cli"
    assert Path(cvcore.adapters.__file__).parent == root / "adapters"
    # Nothing called backends / cli / adapters lands at the top of site-packages.
    code = ("import importlib.util, json; print(json.dumps([m for m in ('backends', 'cli', "
            "'adapters') if importlib.util.find_spec(m) is not None]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert json.loads(out.stdout) == []
