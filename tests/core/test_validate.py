"""The checks made once in front of every backend (``cvcore/validate.py``): an empty batch,
the operator in train mode and a kernel too large for memory are refused before any
backend method runs, with the same message for every backend; backends called directly
refuse the same way. Also: the request and the estimator settings travel unchanged from
``measure_checkpoints`` to the backend, and ``estimate`` resolves the backend once."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cvcore
from cvcore import memory, plugins
from cvcore.api import make_request
from cvcore.errors import InputError, ResourceError
from cvcore.estimate import EstimatorOptions, estimate_request
from cvcore.protocols import KernelRequest
from cvcore.validate import check_call, require_samples, sample_count

EMPTY = "expected at least one input sample, got an empty batch"
TRAIN = ("expected train=False for the matrix-free operator (batch statistics and dropout "
         "change between products), got train=True; use method='exact'")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "numpy-backend-plugin" / "src"
FRAMEWORK_OF = {"torch": "torch", "jax": "jax", "tensorflow": "keras"}  # backend → _backends key


def _jax_pair() -> tuple[Any, Any]:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3))), "b": jnp.zeros(3)}
    return (lambda p, x: jnp.tanh(x @ p["w"] + p["b"])), params


def _keras_model() -> Any:
    keras = pytest.importorskip("keras")
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def _torch_model() -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type, *methods: str) -> list[str]:
    """Replace ``cls``'s methods by ones that record the call and fail the test."""
    called: list[str] = []
    for name in methods:
        def method(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
            called.append(_name)
            raise AssertionError(f"{cls.__name__}.{_name} ran before the front checks")
        monkeypatch.setattr(cls, name, method)
    return called


def _little_memory(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: free)


# --------------------------------------------------------------------------- the checks


def test_sample_count_reads_arrays_and_containers_and_leaves_the_rest() -> None:
    assert sample_count(np.zeros((5, 2))) == 5
    assert sample_count({"a": np.zeros((3, 1)), "b": np.zeros((3,))}) == 3
    assert sample_count((np.zeros((0, 2)),)) == 0
    assert sample_count("text") is None and sample_count(None) is None  # the backend says why
    with pytest.raises(InputError, match=f"^{EMPTY}$"):
        require_samples(0)
    require_samples(1)


def test_check_call_refuses_before_any_backend() -> None:
    with pytest.raises(InputError, match=f"^{EMPTY}$"):
        check_call(np.zeros((0, 4)), KernelRequest(), "diagonal")
    with pytest.raises(InputError) as info:
        check_call(np.zeros((3, 4)), KernelRequest(train=True), "operator")
    assert str(info.value) == TRAIN
    check_call(np.zeros((3, 4)), KernelRequest(train=True), "ntk")  # train mode is fine there
    with pytest.raises(InputError, match="capability among"):
        check_call(np.zeros((3, 4)), KernelRequest(), "kernel")  # type: ignore[arg-type]


def test_traced_kernel_too_large_is_refused_from_n_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # N = 1000 traced in float32: 1000² · (4 + 16) bytes = 20 MB needed, 1 MB free
    _little_memory(monkeypatch, 1 << 20)
    with pytest.raises(ResourceError, match="traced kernel of dimension 1000"):
        check_call(np.zeros((1000, 4)), KernelRequest(), "ntk")
    with pytest.raises(ResourceError, match="traced kernel of dimension 1000"):
        check_call(np.zeros((1000, 4)), KernelRequest(), "layers")
    check_call(np.zeros((1000, 4)), KernelRequest(), "diagonal")  # never forms the kernel
    check_call(np.zeros((1000, 4)), KernelRequest(), "operator")
    check_call(np.zeros((100, 4)), KernelRequest(), "ntk")  # 200 kB fits


# --------------------------------------------------------------------------- memory, per backend


def test_jax_request_too_large_is_refused_before_the_backend(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from cvcore.backends.jax.backend import JaxBackend

    model, x = _jax_pair(), np.zeros((1000, 4))
    _little_memory(monkeypatch, 1 << 20)
    called = _spy(monkeypatch, JaxBackend, "ntk", "layer_kernels")
    with pytest.raises(ResourceError, match="dimension 1000"):
        cvcore.ntk(model, x)
    with pytest.raises(ResourceError, match="dimension 1000"):
        cvcore.measure(model, x)
    with pytest.raises(ResourceError, match="dimension 1000"):
        cvcore.measure(model, x, per_layer=True)
    with pytest.raises(ResourceError, match="dimension 1000"):
        cvcore.estimate(model, x, method="exact")
    assert called == []


def test_keras_request_too_large_is_refused_before_the_backend(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from cvcore.backends.keras.backend import KerasBackend

    model, x = _keras_model(), np.zeros((1000, 4), dtype=np.float32)
    _little_memory(monkeypatch, 1 << 20)
    called = _spy(monkeypatch, KerasBackend, "ntk", "layer_kernels")
    with pytest.raises(ResourceError, match="dimension 1000"):
        cvcore.ntk(model, x)
    with pytest.raises(ResourceError, match="dimension 1000"):
        cvcore.measure(model, x, per_layer=True)
    assert called == []


def test_full_kernels_too_large_are_refused_once_o_is_known(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The full kernel's size needs O (3 here), which only the backend probes: N = 10 in
    float64 needs 10² · 24 B = 2.4 kB traced, 30² · 24 B = 21.6 kB full; 5 kB are free."""
    from cvcore.backends.jax.backend import JaxBackend

    x = np.random.default_rng(1).standard_normal((10, 4))
    _little_memory(monkeypatch, 5000)
    request = KernelRequest(kernel="full", dtype="float64")
    with pytest.raises(ResourceError, match="full kernel of dimension 30"):
        JaxBackend().ntk(_jax_pair(), x, request)
    with pytest.raises(ResourceError, match="full kernel of dimension 30"):
        plugins.get_backend("tensorflow").ntk(_keras_model(), x, request)
    traced = JaxBackend().ntk(_jax_pair(), x, KernelRequest(dtype="float64"))
    assert traced.kernel.shape == (10, 10)


# --------------------------------------------------------------------------- empty batch, everywhere


def _numpy_example() -> tuple[Any, Any]:
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from cvcore_numpy_mlp import NumpyMLP
    from cvcore_numpy_mlp.backend import NumpyMLPBackend

    return NumpyMLPBackend(), NumpyMLP.random([4, 5, 3], seed=0)


@functools.cache
def _backends() -> dict[str, tuple[Any, Any, Any]]:
    """Backend, model and an empty batch for each framework installed here."""
    out: dict[str, tuple[Any, Any, Any]] = {}
    empty = np.zeros((0, 4), dtype=np.float32)
    try:
        out["torch"] = (plugins.get_backend("torch"), _torch_model(), empty)
    except pytest.skip.Exception:
        pass
    try:
        out["jax"] = (plugins.get_backend("jax"), _jax_pair(), empty)
    except pytest.skip.Exception:
        pass
    try:
        out["keras"] = (plugins.get_backend("tensorflow"), _keras_model(), empty)
    except pytest.skip.Exception:
        pass
    backend, model = _numpy_example()
    out["numpy-example"] = (backend, model, empty)
    return out


def test_empty_batch_message_is_identical_for_every_backend_called_directly() -> None:
    seen: dict[str, str] = {}
    for name, (backend, model, empty) in _backends().items():
        methods = [m for m in ("ntk", "diagonal", "operator", "layer_kernels")
                   if hasattr(backend, m)]
        for method in methods:
            with pytest.raises(InputError) as info:
                getattr(backend, method)(model, empty, make_request())
            seen[f"{name}.{method}"] = str(info.value)
    assert {"torch.ntk", "jax.ntk", "keras.ntk", "numpy-example.ntk"} <= set(seen)
    assert set(seen.values()) == {EMPTY}, seen


def test_empty_batch_is_refused_in_front(backend_name: str, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    backend, model, empty = _backends()[FRAMEWORK_OF[backend_name]]
    methods = [m for m in ("ntk", "diagonal", "operator", "layer_kernels") if hasattr(backend, m)]
    called = _spy(monkeypatch, type(backend), *methods)
    calls = [lambda: cvcore.ntk(model, empty), lambda: cvcore.measure(model, empty),
             lambda: cvcore.measure(model, empty, variables="trace"),
             lambda: cvcore.measure(model, empty, per_layer=True),
             lambda: cvcore.estimate(model, empty, method="exact"),
             lambda: cvcore.estimate(model, empty, method="stochastic")]
    for call in calls:
        if "operator" not in methods and call is calls[-1]:
            continue
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == EMPTY
    assert called == []


@pytest.mark.parametrize("backend_name", ["torch", "jax"], indirect=True)
def test_operator_in_train_mode_is_refused_in_front_and_directly(
        backend_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, model, _ = _backends()[FRAMEWORK_OF[backend_name]]
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(InputError) as direct:
        backend.operator(model, x, make_request(train=True))
    called = _spy(monkeypatch, type(backend), "operator")
    with pytest.raises(InputError) as front:
        cvcore.estimate(model, x, method="stochastic", train=True)
    assert str(direct.value) == str(front.value) == TRAIN and called == []


# --------------------------------------------------------------------------- one request, one resolve


def test_estimator_options_are_checked_once_and_keep_the_stored_settings() -> None:
    options = EstimatorOptions(method="stochastic", probes=24, steps=30, top_k=10, seed=0)
    assert options.settings() == {"method": "stochastic", "probes": 24, "steps": 30,
                                  "top_k": 10, "seed": 0}
    assert EstimatorOptions(deflate=False).settings()["deflate"] is False
    assert EstimatorOptions.from_mapping({"method": "exact", "top_k": 3}).top_k == 3
    with pytest.raises(InputError, match="method among"):
        EstimatorOptions(method="lanczos")
    with pytest.raises(InputError, match="estimator options among"):
        EstimatorOptions.from_mapping({"metod": "exact"})


def test_request_and_settings_travel_unchanged_to_the_backend(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.protocols import LoadOptions
    from cvcore.runs import ProbeSpec, measure_checkpoints, run_settings

    torch.save(_torch_model(), tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((6, 4)))
    request = make_request(dtype="float64", memory_budget="64MB")
    options = EstimatorOptions(method="stochastic", probes=4, steps=3, top_k=2)
    seen: list[KernelRequest] = []
    real_operator, real_diagonal = TorchBackend.operator, TorchBackend.diagonal

    def operator(self: Any, model: Any, inputs: Any, req: KernelRequest) -> Any:
        seen.append(req)
        return real_operator(self, model, inputs, req)

    def diagonal(self: Any, model: Any, inputs: Any, req: KernelRequest) -> Any:
        seen.append(req)
        return real_diagonal(self, model, inputs, req)

    monkeypatch.setattr(TorchBackend, "operator", operator)
    monkeypatch.setattr(TorchBackend, "diagonal", diagonal)
    probe = ProbeSpec(str(tmp_path / "x.npy"))
    (row,) = measure_checkpoints([tmp_path / "m.pt"], probe=probe, request=request,
                                 options=LoadOptions(), estimator=options)
    assert len(seen) == 2 and all(r is request for r in seen)
    assert row.variables.method == "stochastic" and row.variables.probes == 4
    # the stored settings are those the keyword form always gave
    as_dict = {"method": "stochastic", "probes": 4, "steps": 3, "top_k": 2, "seed": 0}
    assert run_settings(probe, request, LoadOptions(), estimator=options) == \
        run_settings(probe, request, LoadOptions(), estimator=as_dict)
    (again,) = measure_checkpoints([tmp_path / "m.pt"], probe=probe, request=request,
                                   options=LoadOptions(), estimator=as_dict)
    assert again.variables.entropy == row.variables.entropy


@pytest.mark.parametrize("method", ["auto", "exact", "stochastic"])
def test_estimate_resolves_the_backend_once(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    real = plugins.select_backend
    calls: list[Any] = []

    def counting(model: Any) -> Any:
        calls.append(model)
        return real(model)

    monkeypatch.setattr(plugins, "select_backend", counting)
    x = np.random.default_rng(0).standard_normal((6, 4))
    est = estimate_request(_torch_model(), x, make_request(dtype="float64"),
                           EstimatorOptions(method=method, probes=4, steps=3, top_k=2))
    assert est.method == ("exact" if method == "auto" else method)  # auto: D = 6 fits
    assert len(calls) == 1


def test_estimators_import_numpy_and_the_lowest_floors_only() -> None:
    import ast

    allowed = {"__future__", "math", "dataclasses", "typing", "collections.abc", "numpy",
               "numpy.typing",
               "cvcore", "cvcore.errors", "cvcore.protocols", "cvcore.spectrum"}
    folder = Path(__file__).resolve().parents[2] / "cvcore" / "estimators"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name in allowed or name.startswith("cvcore.estimators"), (path.name, name)
            if isinstance(node, ast.ImportFrom) and node.module == "cvcore":
                assert [a.name for a in node.names] == ["progress"], path.name
