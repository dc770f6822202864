"""Keras convolution models: the kernel on every Keras backend reachable here against
per-sample, per-output GradientTape gradients (float64), the trace-only diagonal against
the kernel's diagonal, and TensorFlow's log noise silenced and restored."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":  # pragma: no cover - KERAS_BACKEND set outside
    pytest.skip("these tests run Keras on the tensorflow backend in-process", allow_module_level=True)

from cvcore.backends.keras import jacobian
from cvcore.backends.keras.backend import KerasBackend

import cvcore
from cvcore.protocols import KernelRequest
from tests.tolerance import rel_error as rel


def build(dtype: str) -> keras.Model:
    """A small conv net: a 3×3 convolution, a depthwise one, batch norm, pooling, dense."""
    import keras

    return keras.Sequential([
        keras.Input((6, 6, 2), dtype=dtype),
        keras.layers.Conv2D(3, 3, padding="same", activation="tanh", dtype=dtype),
        keras.layers.DepthwiseConv2D(3, dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.Activation("tanh", dtype=dtype),
        keras.layers.GlobalAveragePooling2D(dtype=dtype),
        keras.layers.Dense(4, dtype=dtype),
    ])


N_OUT = 4


def weights(seed: int = 0) -> list[np.ndarray]:
    """float32-exact weights (batch-norm variance positive), shared with the subprocesses."""
    rng = np.random.default_rng(seed)
    out = []
    for w in build("float32").weights:
        value = rng.normal(size=tuple(w.shape)).astype(np.float32)
        out.append(np.abs(value) + 0.5 if "variance" in w.path else value)
    return out


def conv_net(dtype: str = "float64") -> keras.Model:
    model = build(dtype)
    model.set_weights([w.astype(dtype) for w in weights()])
    return model


def inputs(n: int = 5) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 6, 6, 2)).astype(np.float32)


def reference(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Both kernels from one GradientTape per sample and output (ordinary ``model(x)``)."""
    variables = model.trainable_variables
    rows = []
    for i in range(len(x)):
        per_out = []
        for o in range(N_OUT):
            with tf.GradientTape() as tape:
                y = model(x[i:i + 1], training=False)[0, o]
            grads = tape.gradient(y, variables)
            per_out.append(np.concatenate([g.numpy().ravel() for g in grads]))
        rows.append(per_out)
    jac = np.asarray(rows, dtype=np.float64)
    flat = jac.reshape(len(x) * N_OUT, -1)
    return {"traced": np.einsum("iop,jop->ij", jac, jac) / N_OUT, "full": flat @ flat.T}


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return reference(conv_net(), inputs().astype(np.float64))


@pytest.mark.parametrize("strategy", ["auto", "vectorized", "batched"])
@pytest.mark.parametrize("kind", ["traced", "full"])
def test_conv_kernel_matches_tape_loops(ref, kind, strategy, monkeypatch):
    """``auto`` is the per-sample loop for a model with convolutions."""
    monkeypatch.setattr(jacobian, "TF_VECTORIZE", strategy)
    k = cvcore.ntk(conv_net(), inputs(), kernel=kind, dtype="float64")
    assert rel(k, ref[kind]) < 1e-10
    assert jacobian.has_convolution(conv_net()) and not jacobian.has_convolution(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_conv_kernel_blocked_and_float32(ref):
    """48 bytes: one sample and one variable at a time; float32 from the float32 model."""
    blocked = cvcore.ntk(conv_net(), inputs(), dtype="float64", memory_budget=48)
    assert rel(blocked, ref["traced"]) < 1e-10
    k32 = cvcore.ntk(conv_net("float32"), inputs(), dtype="float32")
    assert k32.dtype == np.float32 and 0 < rel(k32, ref["traced"]) < 1e-4


def test_traced_functions_serve_later_calls_with_new_weights():
    """A second call on the same model reuses the traced functions with the new weights
    (BN statistics included); freezing a layer changes the key. The model is built under
    a float64 dtype policy, so that it is measured as is (not a recast copy)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        model, x = conv_net(), inputs()
    finally:
        keras.config.set_dtype_policy(previous)
    jacobian.TF_FUNCTIONS.clear()
    first = cvcore.ntk(model, x, dtype="float64")
    (entry,) = jacobian.TF_FUNCTIONS.values()
    functions = dict(entry[2])
    model.set_weights([w * 1.1 for w in model.get_weights()])
    second = cvcore.ntk(model, x, dtype="float64")
    assert len(jacobian.TF_FUNCTIONS) == 1 and entry[2] == functions  # the very same ones
    assert rel(second, reference(model, x.astype(np.float64))["traced"]) < 1e-10
    assert rel(second, first) > 1e-2
    model.layers[0].trainable = False
    third = cvcore.ntk(model, x, dtype="float64")
    assert len(jacobian.TF_FUNCTIONS) == 2
    assert rel(third, reference(model, x.astype(np.float64))["traced"]) < 1e-10


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", ["traced", "full"])
def test_diagonal_is_the_kernels_diagonal(kind, train):
    model, x = conv_net(), inputs()
    kernel = cvcore.ntk(model, x, kernel=kind, dtype="float64", train=train)
    request = KernelRequest(kernel=kind, dtype="float64", train=train)
    diag = KerasBackend().diagonal(model, x, request)
    assert diag.shape == (kernel.shape[0],) and diag.dtype == np.float64
    assert rel(diag, np.diag(kernel)) < 1e-12
    tiny = KerasBackend().diagonal(model, x, KernelRequest(kernel=kind, dtype="float64",
                                                           train=train, memory_budget=48))
    assert rel(tiny, np.diag(kernel)) < 1e-12


def test_trace_only_measure_uses_the_diagonal(ref, monkeypatch):
    """``variables=["trace"]`` never builds the kernel."""
    monkeypatch.setattr(KerasBackend, "ntk", lambda *a, **k: pytest.fail("kernel was built"))
    got = cvcore.measure(conv_net(), inputs(), variables=["trace"], dtype="float64")
    assert abs(got.trace - np.trace(ref["traced"])) < 1e-10 * np.trace(ref["traced"])


# --------------------------------------------------------------------------- log noise


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_framework_noise_is_silenced_and_the_log_level_restored(monkeypatch):
    """The vectorized strategy makes pfor warn once per convolution; inside a measurement
    nothing reaches the ``tensorflow`` logger's handlers, and its level is back after."""
    logger = logging.getLogger("tensorflow")
    records = Records()
    logger.addHandler(records)
    saved = logger.level
    logger.setLevel(logging.INFO)
    try:
        # the control: the same pfor computation outside cvcore does print the warning
        kernel = tf.Variable(tf.ones((3, 3, 2, 3), tf.float64))

        @tf.function
        def per_sample(xs):
            def one(xi):
                with tf.GradientTape() as tape:
                    y = tf.reduce_sum(tf.nn.conv2d(xi[None], kernel, 1, "SAME"), axis=(1, 2))[0]
                return tape.jacobian(y, kernel, experimental_use_pfor=True)
            return tf.vectorized_map(one, xs)

        per_sample(tf.constant(inputs(2), tf.float64))
        assert any("while_loop" in m for m in records.messages)
        records.messages.clear()
        monkeypatch.setattr(jacobian, "TF_VECTORIZE", "vectorized")
        cvcore.ntk(conv_net(), inputs(), dtype="float64")
        KerasBackend().diagonal(conv_net(), inputs(), KernelRequest(dtype="float64"))
        assert records.messages == []
        assert logger.level == logging.INFO
        with pytest.raises(cvcore.errors.InputError):
            cvcore.ntk(conv_net(), np.zeros((2, 6, 6, 3)), dtype="float64")
        assert logger.level == logging.INFO  # restored on errors too
    finally:
        logger.removeHandler(records)
        logger.setLevel(saved)


# --------------------------------------------------------------------------- other Keras backends

SCRIPT = textwrap.dedent(inspect.getsource(build)).replace(" -> keras.Model", "") + textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    import cvcore
    from cvcore.backends.keras.backend import KerasBackend
    from cvcore.protocols import KernelRequest

    used = []
    if keras.backend.backend() == "jax":
        from cvcore.backends.jax import structured as jax_structured

        original = jax_structured.structured_kernel

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            used.append(result is not None)
            return result

        jax_structured.structured_kernel = spy
    model = build("float32")
    model.set_weights([np.asarray(w, np.float32) for w in json.loads(sys.argv[1])])
    x = np.asarray(json.loads(sys.argv[2]), np.float32)
    out = {"backend": keras.backend.backend()}
    for impl in ("structured", "jacobian"):
        for kind in ("traced", "full"):
            out[impl + kind] = cvcore.ntk(model, x, kernel=kind, dtype="float64",
                                          implementation=impl).tolist()
    out["diagonal"] = KerasBackend().diagonal(model, x, KernelRequest(dtype="float64")).tolist()
    out["structured_used"] = used
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_conv_net_on_jax_and_torch_keras():
    """Keras on JAX goes through the JAX backend's structured engine (the conv rule is
    used); Keras on torch through ``torch.func``; both equal the GradientTape reference."""
    import importlib.util

    wanted = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
    if not wanted:
        pytest.skip("neither jax nor torch is installed")
    x = inputs(4)
    argv = [json.dumps([w.tolist() for w in weights()]), json.dumps(x.tolist())]
    running = {b: subprocess.Popen([sys.executable, "-c", SCRIPT, *argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "KERAS_BACKEND": b}) for b in wanted}
    done = {b: p.communicate(timeout=300) + (p.returncode,) for b, p in running.items()}
    expected = reference(conv_net(), x.astype(np.float64))
    for backend, (stdout, stderr, code) in done.items():
        assert code == 0, stderr[-2000:]
        got = json.loads(stdout.strip().splitlines()[-1])
        assert got["backend"] == backend
        for impl in ("structured", "jacobian"):
            for kind in ("traced", "full"):
                assert rel(np.asarray(got[impl + kind]), expected[kind]) < 1e-10, (
                    backend, impl, kind)
        assert rel(np.asarray(got["diagonal"]), np.diag(expected["traced"])) < 1e-10
        if backend == "jax":
            assert got["structured_used"] and all(got["structured_used"])
