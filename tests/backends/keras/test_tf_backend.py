"""The TensorFlow / Keras backend against explicit per-sample, per-output GradientTape
gradients; tf.Module and SavedModel; Keras on the torch and jax backends; loaders; CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":  # pragma: no cover - KERAS_BACKEND set outside
    pytest.skip("these tests run Keras on the tensorflow backend in-process", allow_module_level=True)

from cvcore.backends.keras.backend import KerasBackend

import cvcore
from cvcore import plugins
from cvcore.errors import InputError, ModelError, UntrustedFileError
from cvcore.protocols import LoadOptions
from tests.tolerance import rel_error as rel

N_IN, N_HID, N_OUT = 5, 7, 3


def build_mlp(dtype: str = "float32") -> keras.Model:
    return keras.Sequential([
        keras.Input((N_IN,), dtype=dtype),
        keras.layers.Dense(N_HID, activation="tanh", dtype=dtype),
        keras.layers.LayerNormalization(dtype=dtype),
        keras.layers.Dense(N_OUT, dtype=dtype),
    ])


def weights(seed: int = 0) -> list[np.ndarray]:
    """float32-exact weights, so the float32 and float64 models hold the same numbers."""
    rng = np.random.default_rng(seed)
    shapes = [w.shape for w in build_mlp().get_weights()]
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def mlp(dtype: str = "float32", seed: int = 0) -> keras.Model:
    model = build_mlp(dtype)
    model.set_weights([w.astype(dtype) for w in weights(seed)])
    return model


def inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, N_IN)).astype(np.float32)


def reference_jacobian(call, variables, x: np.ndarray) -> np.ndarray:
    """J[i, o, :]: one GradientTape per sample and output, ordinary ``model(x)`` calls."""
    rows = []
    for i in range(len(x)):
        per_out = []
        for o in range(N_OUT):
            with tf.GradientTape() as tape:
                y = tf.reshape(call(x[i:i + 1]), [-1])[o]
            grads = tape.gradient(y, variables)
            per_out.append(np.concatenate([
                (np.zeros(v.shape) if g is None else g.numpy()).ravel()
                for g, v in zip(grads, variables)]))
        rows.append(per_out)
    return np.asarray(rows, dtype=np.float64)


def kernels_from(jac: np.ndarray) -> dict[str, np.ndarray]:
    n, o, _ = jac.shape
    flat = jac.reshape(n * o, -1)
    return {"traced": np.einsum("iop,jop->ij", jac, jac) / o, "full": flat @ flat.T}


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    model = mlp("float64")
    return kernels_from(reference_jacobian(model, model.trainable_variables,
                                           inputs(6).astype(np.float64)))


@pytest.mark.parametrize("kind", ["traced", "full"])
def test_float64_matches_tape_loops(reference, kind):
    """A float32 model measured in float64 (re-created in float64, weights cast)."""
    model = mlp("float32")
    k = cvcore.ntk(model, inputs(6), kernel=kind, dtype="float64")
    assert k.dtype == np.float64 and k.shape == reference[kind].shape
    assert rel(k, reference[kind]) < 1e-10


@pytest.mark.parametrize("kind", ["traced", "full"])
def test_float32_matches_reference(reference, kind):
    k = cvcore.ntk(mlp("float32"), inputs(6), kernel=kind, dtype="float32")
    assert k.dtype == np.float32
    err = rel(k, reference[kind])
    assert err < 1e-4
    assert err > 0  # it really is float32 arithmetic, not a float64 kernel cast down


def test_traced_is_mean_of_output_diagonal_blocks():
    model, x = mlp(), inputs(5)
    traced = cvcore.ntk(model, x, kernel="traced", dtype="float64")
    full = cvcore.ntk(model, x, kernel="full", dtype="float64")
    blocks = full.reshape(5, N_OUT, 5, N_OUT)
    assert rel(traced, np.einsum("aobo->ab", blocks) / N_OUT) < 1e-12


@pytest.mark.parametrize(("kind", "budget"), [("traced", 64), ("full", 2000)])
def test_blocking_invariance(kind, budget):
    """64 bytes: one sample and one tensor at a time; 2000: several samples per block."""
    model, x = mlp(), inputs(7)  # 7: no block size divides it
    whole = cvcore.ntk(model, x, kernel=kind, dtype="float64", memory_budget="1GB")
    blocked = cvcore.ntk(model, x, kernel=kind, dtype="float64", memory_budget=budget)
    assert rel(blocked, whole) < 1e-12


def test_users_model_is_untouched():
    model = mlp("float32")
    before = [w.copy() for w in model.get_weights()]
    policy = keras.config.dtype_policy().name
    cvcore.ntk(model, inputs(3), dtype="float64", train=True)
    assert [str(v.dtype) for v in model.weights] == ["float32"] * len(model.weights)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert keras.config.dtype_policy().name == policy


def test_frozen_layers_are_excluded(reference):
    model = mlp("float64")
    model.layers[0].trainable = False
    k = cvcore.ntk(model, inputs(6), dtype="float64")
    tv = model.trainable_variables
    ref = kernels_from(reference_jacobian(model, tv, inputs(6).astype(np.float64)))["traced"]
    assert rel(k, ref) < 1e-10
    assert rel(k, reference["traced"]) > 1e-3  # the first layer's share is gone


def test_selection_and_accepts():
    model = mlp()
    backend = plugins.select_backend(model)
    assert backend.name == "tensorflow"
    assert plugins.registry().backends["torch"].accepts(model) is False
    assert KerasBackend().accepts(np.zeros(3)) is False


# --------------------------------------------------------------------------- tf.Module


class TinyModule(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.w = tf.Variable(rng.normal(size=(N_IN, N_HID)))
        self.shift = tf.Variable(rng.normal(size=N_HID), trainable=False)
        self.v = tf.Variable(rng.normal(size=(N_HID, N_OUT)))

    @tf.function(input_signature=[tf.TensorSpec([None, N_IN], tf.float64)])
    def __call__(self, x):
        return tf.tanh(x @ self.w + self.shift) @ self.v


def test_tf_module_matches_tape_loops():
    module = TinyModule()
    x = inputs(5).astype(np.float64)
    ref = kernels_from(reference_jacobian(module, [module.w, module.v], x))
    for kind in ("traced", "full"):
        assert rel(cvcore.ntk(module, x, kernel=kind, dtype="float64"), ref[kind]) < 1e-10
    assert rel(cvcore.ntk(module, x, dtype="float64", memory_budget=64), ref["traced"]) < 1e-10


def test_saved_model_matches_module(tmp_path):
    module = TinyModule()
    tf.saved_model.save(module, str(tmp_path / "sm"))
    loaded = plugins.registry().checkpoint_loaders["saved-model"].load(tmp_path / "sm",
                                                                       LoadOptions())
    x = inputs(5).astype(np.float64)
    expected = cvcore.ntk(module, x, dtype="float64")
    assert rel(cvcore.ntk(loaded.model, x, dtype="float64"), expected) < 1e-12
    with pytest.raises(ModelError, match=r"matching the module's trainable variables \(float64\)"):
        cvcore.ntk(loaded.model, x, dtype="float32")


def test_keras_export_saved_model(tmp_path):
    model = mlp("float32")
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    x = inputs(4)
    assert rel(cvcore.ntk(loaded, x), cvcore.ntk(model, x)) < 1e-5


def test_saved_model_without_trainable_variables(tmp_path):
    class Frozen(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.ones((N_IN, 2)), trainable=False)

        @tf.function(input_signature=[tf.TensorSpec([None, N_IN], tf.float64)])
        def __call__(self, x):
            return x @ self.w

    tf.saved_model.save(Frozen(), str(tmp_path / "frozen"))
    with pytest.raises(ModelError, match="with trainable variables, got none"):
        cvcore.ntk(tf.saved_model.load(str(tmp_path / "frozen")), inputs(2), dtype="float64")


# --------------------------------------------------------------------------- errors


def test_wrong_input_shape_names_both():
    with pytest.raises(InputError) as info:
        cvcore.ntk(mlp(), np.zeros((3, 4), np.float32))
    message = str(info.value)
    assert "(None, 5)" in message and "per-sample shape (4,)" in message and "\n" not in message


def test_no_trainable_parameters():
    model = mlp()
    model.trainable = False
    with pytest.raises(ModelError, match="trainable variables, got none"):
        cvcore.ntk(model, inputs(2))


def test_nan_inputs_name_the_samples():
    x = inputs(6)
    x[2, 0] = np.nan
    x[4, 1] = np.inf
    with pytest.raises(ModelError, match=r"2 of 6 samples \(indices 2, 4\)"):
        cvcore.ntk(mlp(), x, dtype="float64")


def test_nan_weights_are_reported():
    model = mlp()
    w = model.get_weights()
    w[0][0, 0] = np.nan
    model.set_weights(w)
    with pytest.raises(ModelError, match="NaN or Inf in variable"):
        cvcore.ntk(model, inputs(2))


def two_heads() -> keras.Model:
    x = keras.Input((N_IN,))
    h = keras.layers.Dense(4, activation="tanh")(x)
    return keras.Model(x, {"a": keras.layers.Dense(2)(h), "b": keras.layers.Dense(3)(h)})


def test_output_selector():
    model = two_heads()
    x = inputs(4)
    with pytest.raises(ModelError, match=r"mapping with keys \['a', 'b'\]"):
        cvcore.ntk(model, x)
    with pytest.raises(ModelError, match=r"one of a mapping with keys \['a', 'b'\], got 'c'"):
        cvcore.ntk(model, x, output="c")
    by_key = cvcore.ntk(model, x, output="b", kernel="full", dtype="float64")
    by_callable = cvcore.ntk(model, x, output=lambda raw: raw["b"], kernel="full",
                             dtype="float64")
    assert by_key.shape == (12, 12) and rel(by_key, by_callable) < 1e-14
    variables = model.trainable_variables
    ref = kernels_from(reference_jacobian(lambda t: model(t)["b"], variables, x))["full"]
    assert rel(by_key, ref) < 1e-5  # the reference runs the float32 model


# --------------------------------------------------------------------------- other Keras backends

SCRIPT = textwrap.dedent(f"""
    import json, sys
    import numpy as np
    import keras
    import cvcore
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input(({N_IN},)),
                              keras.layers.Dense({N_HID}, activation="tanh"),
                              keras.layers.LayerNormalization(),
                              keras.layers.Dense({N_OUT})])
    model.set_weights([np.asarray(w, np.float32) for w in json.loads(sys.argv[1])])
    x = np.asarray(json.loads(sys.argv[2]), np.float32)
    out = {{"backend": keras.backend.backend()}}
    for dtype in ("float32", "float64"):
        for kind in ("traced", "full"):
            out[dtype + kind] = cvcore.ntk(model, x, kernel=kind, dtype=dtype).tolist()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_keras_on_torch_and_jax_give_the_same_kernel():
    """Both subprocesses run at once (each imports its framework and Keras)."""
    import importlib.util

    wanted = [b for b in ("torch", "jax") if importlib.util.find_spec(b) is not None]
    if not wanted:
        pytest.skip("neither torch nor jax is installed")
    x = inputs(4)
    argv = [json.dumps([w.tolist() for w in weights()]), json.dumps(x.tolist())]
    running = {b: subprocess.Popen([sys.executable, "-c", SCRIPT, *argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "KERAS_BACKEND": b}) for b in wanted}
    outputs = {b: p.communicate(timeout=180) + (p.returncode,) for b, p in running.items()}
    model = mlp()
    ours = {(d, k): cvcore.ntk(model, x, kernel=k, dtype=d)
            for d in ("float32", "float64") for k in ("traced", "full")}
    for keras_backend, (stdout, stderr, code) in outputs.items():
        assert code == 0, stderr[-2000:]
        got = json.loads(stdout.strip().splitlines()[-1])
        assert got["backend"] == keras_backend
        for (dtype, kind), expected in ours.items():
            theirs = np.asarray(got[dtype + kind])
            assert np.abs(theirs).max() > 1.0  # nonzero: functional_call would give zeros
            tol = 1e-10 if dtype == "float64" else 1e-4
            assert rel(theirs, expected) < tol, (keras_backend, dtype, kind)


# --------------------------------------------------------------------------- loaders and CLI


def test_keras_archive_loader(tmp_path):
    model = mlp()
    path = tmp_path / "model.keras"
    model.save(path)
    loader = plugins.registry().checkpoint_loaders["keras"]
    assert loader.sniff(path)
    assert not plugins.registry().checkpoint_loaders["keras-h5"].sniff(path)
    loaded = loader.load(path, LoadOptions())
    assert rel(cvcore.ntk(loaded.model, inputs(3)), cvcore.ntk(model, inputs(3))) < 1e-6


def test_h5_loader_whole_model(tmp_path):
    model = mlp()
    path = tmp_path / "legacy.h5"
    model.save(path)
    from cvcore.checkpoints import load_checkpoint

    loaded = load_checkpoint(path, LoadOptions())
    assert rel(cvcore.ntk(loaded.model, inputs(3)), cvcore.ntk(model, inputs(3))) < 1e-6


def test_lambda_layer_is_refused_without_trust(tmp_path):
    model = keras.Sequential([keras.Input((N_IN,)), keras.layers.Lambda(lambda t: t * 2.0),
                              keras.layers.Dense(2)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    loader = plugins.registry().checkpoint_loaders["keras"]
    with pytest.raises(UntrustedFileError, match="pass --trust"):
        loader.load(path, LoadOptions())
    trusted = loader.load(path, LoadOptions(trust=True)).model
    assert rel(cvcore.ntk(trusted, inputs(3)), cvcore.ntk(model, inputs(3))) < 1e-6


def test_not_a_keras_archive(tmp_path):
    path = tmp_path / "fake.keras"
    path.write_bytes(b"not a zip at all")
    loader = plugins.registry().checkpoint_loaders["keras"]
    assert not loader.sniff(path)
    with pytest.raises(InputError, match="expected a Keras .keras archive"):
        loader.load(path, LoadOptions())


def digits_model(path: Path) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    model.save(path)
    return model


def test_cli_measure_keras_file(tmp_path):
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    from cvcore.data_io import load_bundled, probe_subset

    path = tmp_path / "model.keras"
    model = digits_model(path)
    result = CliRunner().invoke(make_app(), ["measure", str(path), "--data", "digits",
                                             "--samples", "20", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout[result.stdout.index("["):])[0]
    x = probe_subset(load_bundled("digits")[0], 20, 0)
    expected = cvcore.measure(model, x)
    assert row["backend"] == "tensorflow" and row["n_samples"] == 20
    assert row["trace"] == pytest.approx(expected.trace, rel=1e-5)
    assert row["entropy"] == pytest.approx(expected.entropy, rel=1e-5)


@pytest.mark.slow
def test_cli_subprocess(tmp_path):
    path = tmp_path / "model.keras"
    model = digits_model(path)
    cv = Path(sys.executable).with_name("cv")
    done = subprocess.run([str(cv), "measure", str(path), "--data", "digits", "--samples", "20",
                           "--json", "--dtype", "float64"], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout[done.stdout.index("["):])[0]
    from cvcore.data_io import load_bundled, probe_subset

    x = probe_subset(load_bundled("digits")[0], 20, 0)
    assert row["trace"] == pytest.approx(cvcore.measure(model, x, dtype="float64").trace,
                                         rel=1e-10)


def test_conformance_suite():
    from cvcore.testing import FiniteDifferenceAccess, run_backend_conformance

    def small_model() -> keras.Model:
        model = keras.Sequential([keras.Input((N_IN,), dtype="float64"),
                                  keras.layers.Dense(4, activation="tanh", dtype="float64"),
                                  keras.layers.Dense(2, dtype="float64")])
        rng = np.random.default_rng(5)  # nonzero biases: generic values
        model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
        return model

    def get_params(model: keras.Model) -> np.ndarray:
        return np.concatenate([np.asarray(v).ravel() for v in model.trainable_variables])

    def forward(model: keras.Model, flat: np.ndarray, x: np.ndarray) -> np.ndarray:
        values, start = [], 0
        for v in model.trainable_variables:
            size = int(np.prod(v.shape))
            values.append(tf.constant(flat[start:start + size].reshape(v.shape)))
            start += size
        out, _ = model.stateless_call(values, model.non_trainable_variables,
                                      tf.constant(x, tf.float64))
        return np.asarray(out)

    torch = pytest.importorskip("torch")
    report = run_backend_conformance(
        KerasBackend(), make_model=small_model,
        make_inputs=lambda n: np.random.default_rng(n).normal(size=(n, N_IN)),
        reference=FiniteDifferenceAccess(get_params=get_params, forward=forward),
        foreign=(torch.nn.Linear(2, 2),), bad_inputs={"7 features": np.ones((3, 7))},
        skip=("blocking",))  # checked in test_blocking_invariance, with fewer recompilations
    assert "finite-difference" in report.passed and "errors" in report.passed, str(report)
