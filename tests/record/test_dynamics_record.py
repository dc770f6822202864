"""The Recorder's kernel dynamics: values against float64 formulas on kernels built
independently (``cvcore.ntk`` at each step), motion against hand-built kernel sequences,
resume, and the promise that a Recorder without dynamics is unchanged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cvcore
from cvcore.errors import InputError
from cvcore.record import RecordStore
from cvcore.record.dynamics_state import DYNAMICS_NOTE_KEY, DynamicsState
from cvcore.request import Targets

# -- independent float64 references, written from the formulas -------------------------


def centring(n: int, o: int = 1) -> np.ndarray:
    return np.kron(np.eye(n) - np.ones((n, n)) / n, np.eye(o))


def ref_alignment(k: np.ndarray, y: np.ndarray) -> float:
    """A(K, Y) = <HKH, HYY^T H>_F / (||HKH|| ||HYY^T H||); full kernel: vec(Y) sample-major."""
    n = y.shape[0]
    if k.shape[0] == n:
        h = centring(n)
        kc, t = h @ k @ h, h @ y @ y.T @ h
    else:
        h = centring(n, y.shape[1])
        v = h @ y.reshape(-1)
        kc, t = h @ k @ h, np.outer(v, v)
    return float(np.sum(kc * t) / (np.linalg.norm(kc) * np.linalg.norm(t)))


def flat(k: np.ndarray, r: np.ndarray) -> np.ndarray:
    return r.reshape(-1, 1) if k.shape[0] != r.shape[0] else r


def ref_residual(k: np.ndarray, r: np.ndarray) -> float:
    r = flat(k, r)
    return float(np.trace(r.T @ k @ r) / (np.sum(r * r) * np.trace(k)))


def top(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    lam, u = np.linalg.eigh(k)
    return lam[::-1][:n], u[:, ::-1][:, :n]


def ref_fractions(k: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    r = flat(k, r)
    proj = top(k, n)[1].T @ r
    return np.cumsum(np.sum(proj ** 2, axis=1)) / np.sum(r * r)


def ref_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_overlap(a: np.ndarray, b: np.ndarray, n: int) -> float:
    return float(np.sum((top(a, n)[1].T @ top(b, n)[1]) ** 2) / n)


def one_hot(y: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c)[y]


def check_record(rec: Any, kernels: list[np.ndarray], steps: list[int], y: np.ndarray,
                 outputs: np.ndarray | None, k: int, probe_set: str | None = None,
                 tol: float = 1e-8) -> None:
    """Every dynamics value of the last record against the references."""
    K, K0 = kernels[-1], kernels[0]
    get = lambda v: rec.get(v, probe_set)
    assert get("target_alignment") == pytest.approx(ref_alignment(K, y), abs=tol)
    if outputs is not None:
        r = outputs - y
        assert get("residual_alignment") == pytest.approx(ref_residual(K, r), abs=tol)
        np.testing.assert_allclose(rec.array("residual_fractions", probe_set),
                                   ref_fractions(K, r, k), atol=tol)
    np.testing.assert_allclose(rec.array("top_eigenvalues", probe_set), top(K, k)[0],
                               rtol=tol, atol=tol * np.abs(K).max())
    assert get("kernel_distance_init") == pytest.approx(ref_distance(K0, K), abs=tol)
    assert get("eigenspace_overlap_init") == pytest.approx(ref_overlap(K0, K, k), abs=1e-6)
    if len(kernels) == 1:
        assert math.isnan(get("kernel_distance")) and math.isnan(get("eigenspace_overlap"))
        return
    d = ref_distance(kernels[-2], K)
    assert get("kernel_distance") == pytest.approx(d, abs=tol)
    assert get("kernel_velocity") == pytest.approx(d / (steps[-1] - steps[-2]), abs=tol)
    assert get("eigenspace_overlap") == pytest.approx(ref_overlap(kernels[-2], K, k), abs=1e-6)


# -- torch: each step against cvcore.ntk ------------------------------------------------


def torch_setup(outputs: int = 3, n: int = 12) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, outputs)).double()
    x = np.random.default_rng(0).normal(size=(n, 4))
    y = np.arange(n) % outputs
    return torch, model, x, y


def sgd_step(torch: Any, model: Any, x: np.ndarray, target: np.ndarray) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loss = ((model(torch.tensor(x)) - torch.tensor(target)) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_torch_values_against_formulas_on_independent_kernels(kernel: str) -> None:
    torch, model, x, y = torch_setup()
    onehot = one_hot(y, 3)
    kernels: list[np.ndarray] = []
    steps = [0, 2, 5, 6]
    with cvcore.Recorder(x, targets=y, dynamics=True, top_k=4, dtype="float64",
                         kernel=kernel, variables=["entropy"]) as rec:
        for step in steps:
            got = rec.record(step, model)
            kernels.append(cvcore.ntk(model, torch.tensor(x), dtype="float64", kernel=kernel))
            f = model(torch.tensor(x)).detach().numpy()
            check_record(got, kernels, steps[:len(kernels)], onehot, f, 4)
            assert got.get("entropy") == pytest.approx(
                cvcore.collective_variables(kernels[-1]).entropy, abs=1e-9)
            sgd_step(torch, model, x, onehot)
    assert kernels[-1].shape == ((12, 12) if kernel == "traced" else (36, 36))
    # the conventions name the kernel and the targets
    text = got.convention("target_alignment")
    assert text is not None and "one-hot" in text and kernel in text
    assert "step 5" in (got.convention("kernel_distance") or "")


def test_subsets_and_summaries_and_the_store_round_trip(tmp_path: Path) -> None:
    torch, model, x, y = torch_setup(n=16)
    db = tmp_path / "run.db"
    with cvcore.Recorder(x, targets=y, dynamics=True, top_k=3, dtype="float64",
                         subsets=(3, 6), sink=db, variables=["trace"]) as rec:
        firsts = rec.record(0, model)
        sgd_step(torch, model, x, one_hot(y, 3))
        second = rec.record(1, model)
        index = [p.index for p in rec.parts]
    full0 = cvcore.ntk(model, torch.tensor(x), dtype="float64")  # after the update
    f = model(torch.tensor(x)).detach().numpy()
    per: list[dict[str, float]] = []
    for i, idx in enumerate(index):
        sub = {v.variable: v.value for v in second.values if v.subset == i}
        ks = full0[np.ix_(idx, idx)]
        r = f[idx] - one_hot(y[idx], 3)
        assert sub["target_alignment"] == pytest.approx(ref_alignment(ks, one_hot(y[idx], 3)),
                                                        abs=1e-8)
        assert sub["residual_alignment"] == pytest.approx(ref_residual(ks, r), abs=1e-8)
        np.testing.assert_allclose(second.array("top_eigenvalues", subset=i), top(ks, 3)[0],
                                   rtol=1e-8)
        per.append(sub)
    for var in ("target_alignment", "kernel_distance", "eigenspace_overlap_init"):
        column = [p[var] for p in per]
        summary = next(v for v in second.values if v.variable == var and v.subset is None)
        assert summary.value == pytest.approx(np.mean(column), abs=1e-12)
        assert summary.std == pytest.approx(np.std(column, ddof=1), abs=1e-12)
        assert summary.count == 3 and (summary.convention or "").startswith("mean over subsets")
    mean_top = np.mean([second.array("top_eigenvalues", subset=i) for i in range(3)], axis=0)
    np.testing.assert_allclose(second.array("top_eigenvalues"), mean_top, rtol=1e-12)
    # the trace (diagonal only) is what it is without dynamics
    assert second.get("trace") == pytest.approx(np.mean([np.trace(full0[np.ix_(i, i)])
                                                         for i in index]), rel=1e-10)
    # what the store gives back is what was recorded, arrays and conventions included
    back = RecordStore(db, create=False).records()
    for mine, theirs in zip((firsts, second), back):
        assert len(mine.values) == len(theirs.values)
        for a, b in zip(mine.values, theirs.values):
            assert (a.variable, a.subset, a.convention) == (b.variable, b.subset, b.convention)
            assert (math.isnan(a.value) and math.isnan(b.value)) or a.value == b.value
        assert mine.arrays == theirs.arrays
    rows = RecordStore(db, create=False).rows(arrays=True)
    tops = [r for r in rows if r["variable"] == "top_eigenvalues" and r["step"] == 1
            and r["subset"] is None]
    assert [r["index"] for r in tops] == [0, 1, 2]
    assert [r["value"] for r in tops] == list(second.array("top_eigenvalues"))
    runs = cvcore.read_runs(db)
    assert runs[0]["options"]["dynamics"][0] == "target_alignment"
    assert runs[0]["records"][1]["arrays"][0]["variable"] in ("top_eigenvalues",
                                                              "residual_fractions")


def test_train_mode_takes_each_subsets_own_batch() -> None:
    """train=True: the outputs of each subset from its own batch (one forward pass each);
    a model without dropout or batch norm gives the eval-mode numbers."""
    torch, model, x, y = torch_setup(n=14)
    got = {}
    for train in (False, True):
        with cvcore.Recorder(x, targets=y, subsets=(2, 7), train=train, dtype="float64",
                             variables=["trace"]) as rec:
            got[train] = rec.record(0, model)
            index = [p.index for p in rec.parts]
    f = model(torch.tensor(x)).detach().numpy()
    for i, idx in enumerate(index):
        ks = cvcore.ntk(model, torch.tensor(x[idx]), dtype="float64")
        want = ref_residual(ks, f[idx] - one_hot(y[idx], 3))
        for train in (False, True):
            value = next(v.value for v in got[train].values
                         if v.variable == "residual_alignment" and v.subset == i)
            assert value == pytest.approx(want, abs=1e-9)


def test_float32_rank_deficient_kernels_are_recorded() -> None:
    """N = 40 samples, P = 8 parameters, float32: the kernel has rank <= 8 and round-off
    negative eigenvalues of float32 size, which the dynamics accept (as the spectrum does)
    in the kernel's own precision; the values match float64 formulas to float32 accuracy."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    x = np.random.default_rng(6).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 2
    with cvcore.Recorder(x, targets=y, dynamics=True, top_k=12) as rec:
        got = rec.record(0, model)
    kernel = cvcore.ntk(model, torch.tensor(x), dtype="float64")
    lam = top(kernel, 12)[0]
    rank = int(np.sum(lam > 1e-9 * lam[0]))
    assert rank <= 8  # rank deficient: at most P
    np.testing.assert_allclose(got.array("top_eigenvalues")[:rank], lam[:rank], rtol=1e-4)
    assert np.all(got.array("top_eigenvalues")[rank:] < 1e-5 * lam[0])
    f = model(torch.tensor(x)).detach().numpy().astype(np.float64)
    assert got.get("residual_alignment") == pytest.approx(
        ref_residual(kernel, f - one_hot(y, 2)), rel=1e-4)
    assert got.get("target_alignment") == pytest.approx(ref_alignment(kernel, one_hot(y, 2)),
                                                        rel=1e-4)


def test_labels_as_targets_give_class_residuals() -> None:
    torch, model, x, y = torch_setup()
    with cvcore.Recorder(x, labels=y, targets="labels", dtype="float64") as rec:
        got = rec.record(0, model)
    assert rec.dynamics == ("target_alignment", "residual_alignment", "residual_fractions")
    f = model(torch.tensor(x)).detach().numpy()
    for c in range(3):
        idx = np.flatnonzero(y == c)
        kc = cvcore.ntk(model, torch.tensor(x[idx]), dtype="float64")
        r = f[idx] - one_hot(y[idx], 3)
        assert got.get("residual_alignment", label=str(c)) == pytest.approx(
            ref_residual(kc, r), abs=1e-8)
        # one class: the centred targets are zero, the alignment undefined (missing)
        assert math.isnan(got.get("target_alignment", label=str(c)))


def test_a_recorder_without_dynamics_is_unchanged(tmp_path: Path) -> None:
    _torch, model, x, y = torch_setup()
    with cvcore.Recorder(x, sink=tmp_path / "a.db", variables=["trace", "entropy"]) as plain:
        a = plain.record(0, model)
        assert plain.dynamics == () and plain._execute is plain.measure_request
        assert "dynamics_bytes" not in plain.cost()
    assert a.arrays == () and all(v.convention is None for v in a.values)
    assert [v.variable for v in a.values] == ["trace", "entropy"]
    run = cvcore.read_runs(tmp_path / "a.db")[0]
    assert "dynamics" not in run["options"] and "arrays" not in run["records"][0]
    with cvcore.Recorder(x, targets=y, dynamics=True, variables=["trace", "entropy"]) as dyn:
        b = dyn.record(0, model)
    assert [(v.variable, v.value) for v in b.values][:2] == [(v.variable, v.value)
                                                             for v in a.values]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"targets": np.zeros(5)}, "expected one target per probe sample (12), got 5"),
    ({"targets": {"other": np.zeros(12)}}, "expected targets for probe sets among ['probe']"),
    ({"dynamics": ["nope"]}, "expected dynamics= names among target_alignment"),
    ({"dynamics": ["residual_alignment"]}, "expected targets= for dynamics"),
    ({"dynamics": "yes"}, "expected dynamics= True, False or a list"),
    ({"dynamics": True, "top_k": 0}, "expected top_k= a positive integer, got 0"),
    ({"targets": "labels"}, "expected labels= with targets='labels'"),
    ({"targets": "classes"}, "expected targets= an array, a dict per probe set or 'labels'"),
    ({"targets": np.array(["a"] * 12)}, "expected targets as integer labels or real values"),
])
def test_bad_dynamics_options_are_one_line(tmp_path: Path, kwargs: dict[str, Any],
                                           message: str) -> None:
    x = np.zeros((12, 4))
    with pytest.raises(InputError) as err:
        cvcore.Recorder(x, sink=tmp_path / "r.db", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r.db").exists()  # refused before anything is written


def test_resume_restarts_motion_with_a_note(tmp_path: Path) -> None:
    torch, model, x, y = torch_setup()
    db = tmp_path / "run.db"
    with cvcore.Recorder(x, sink=db, name="long", dynamics=True, dtype="float64") as rec:
        rec.record(0, model)
        sgd_step(torch, model, x, one_hot(y, 3))
        rec.record(1, model)
    kernels = []
    with cvcore.Recorder(x, sink=db, name="long", resume=True, dynamics=True,
                         dtype="float64") as rec:
        for step in (2, 3):
            sgd_step(torch, model, x, one_hot(y, 3))
            got = rec.record(step, model)
            kernels.append(cvcore.ntk(model, torch.tensor(x), dtype="float64"))
            if step == 2:  # motion restarts here: never a distance to a kernel not kept
                assert math.isnan(got.get("kernel_distance"))
                assert "kernel motion restarts here" in got.extras[DYNAMICS_NOTE_KEY]
                assert got.get("kernel_distance_init") == pytest.approx(0.0, abs=1e-12)
            else:
                assert DYNAMICS_NOTE_KEY not in got.extras
                assert got.get("kernel_distance") == pytest.approx(
                    ref_distance(kernels[0], kernels[1]), abs=1e-10)
                assert got.get("kernel_distance_init") == pytest.approx(
                    ref_distance(kernels[0], kernels[1]), abs=1e-10)
            assert "first record after a resume" in got.convention("kernel_distance_init")
    records = RecordStore(db, create=False).records("long")
    assert [r.step for r in records] == [0, 1, 2, 3]
    assert math.isnan(records[2].get("kernel_distance"))  # stored as missing


def test_outputs_that_are_not_finite_leave_the_residual_missing_with_a_note() -> None:
    """Outputs with an Inf (a constant shift: the kernel stays finite) while a residual is
    asked for: the record is written, the residual values are missing, the alignment (which
    needs no outputs) is there."""
    torch = pytest.importorskip("torch")

    class Shifted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("shift", torch.tensor([0.0, math.inf]))

        def forward(self, x: Any) -> Any:
            return self.lin(x) + self.shift

    torch.manual_seed(0)
    model = Shifted().double()
    x = np.random.default_rng(5).normal(size=(6, 3))
    y = np.array([0, 1, 0, 1, 1, 0])
    with cvcore.Recorder(x, targets=y, dtype="float64", variables=["trace"]) as rec:
        got = rec.record(0, model)
    kernel = cvcore.ntk(model, torch.tensor(x), dtype="float64")
    assert got.get("target_alignment") == pytest.approx(ref_alignment(kernel, one_hot(y, 2)),
                                                        abs=1e-10)
    assert math.isnan(got.get("residual_alignment"))
    assert np.isnan(got.array("residual_fractions")).all()
    assert "residual not measured (expected finite outputs" in got.extras[DYNAMICS_NOTE_KEY]


# -- motion against hand-built kernel sequences -----------------------------------------


def rank_one(theta: float) -> np.ndarray:
    u = np.array([math.cos(theta), math.sin(theta), 0.0])
    return np.outer(u, u) + np.diag([0.0, 0.0, 1e-3])  # a small, fixed third mode


def test_motion_of_hand_built_kernels() -> None:
    """K_t = u_t u_t^T (+ a fixed small mode): d(K_s, K_t) = 1 - cos^2(θ_t - θ_s) (up to the
    small mode), and the top-1 eigenspace overlap is cos^2(θ_t - θ_s) exactly."""
    state = DynamicsState(("kernel_distance", "kernel_velocity", "kernel_distance_init",
                           "eigenspace_overlap", "eigenspace_overlap_init", "top_eigenvalues"),
                          top_k=1, kernel="traced", targets={})
    thetas = {0: 0.0, 4: 0.3, 6: 0.9, 7: 0.9}
    prev: tuple[int, float] | None = None
    eps = 1e-3
    for step, theta in thetas.items():
        state.begin(None, step)
        out = state.part(("p", None, None), step, rank_one(theta), None, None)
        k_norm2 = 1 + eps ** 2
        assert out.scalars["kernel_distance_init"] == pytest.approx(
            1 - (math.cos(theta) ** 2 + eps ** 2) / k_norm2, abs=1e-12)
        assert out.scalars["eigenspace_overlap_init"] == pytest.approx(math.cos(theta) ** 2,
                                                                       abs=1e-12)
        assert out.arrays["top_eigenvalues"].tolist() == pytest.approx([1.0])
        if prev is None:
            assert math.isnan(out.scalars["kernel_distance"])
            assert math.isnan(out.scalars["kernel_velocity"])
        else:
            dt = theta - prev[1]
            d = 1 - (math.cos(dt) ** 2 + eps ** 2) / k_norm2
            assert out.scalars["kernel_distance"] == pytest.approx(d, abs=1e-12)
            assert out.scalars["kernel_velocity"] == pytest.approx(d / (step - prev[0]),
                                                                   abs=1e-12)
            assert out.scalars["eigenspace_overlap"] == pytest.approx(math.cos(dt) ** 2,
                                                                      abs=1e-12)
        prev = (step, theta)
    # the kept state: previous and first kernels (3x3) and bases (3x1), float64
    assert state.nbytes() == 2 * (9 * 8) + 2 * (3 * 8)


def test_a_scaled_kernel_has_not_moved_and_a_swapped_one_has_moved_fully() -> None:
    state = DynamicsState(("kernel_distance", "eigenspace_overlap"), top_k=2, kernel="traced",
                          targets={})
    seq = [np.diag([3.0, 1.0, 0.0]), 7 * np.diag([3.0, 1.0, 0.0]), np.diag([0.0, 0.0, 5.0])]
    got = []
    for step, k in enumerate(seq):
        got.append(state.part(("p", None, None), step, k, None, None).scalars)
    assert got[1]["kernel_distance"] == pytest.approx(0.0, abs=1e-15)
    assert got[1]["eigenspace_overlap"] == pytest.approx(1.0, abs=1e-15)
    assert got[2]["kernel_distance"] == pytest.approx(1.0, abs=1e-15)
    # top-2 of diag(0, 0, 5): e3 and one of e1/e2; against {e1, e2}: overlap 1/2
    assert got[2]["eigenspace_overlap"] == pytest.approx(0.5, abs=1e-12)
    # only the previous kernel and basis are kept (no initial ones were asked for)
    assert state.initial[("p", None, None)].kernel is None
    assert state.nbytes() == 9 * 8 + 3 * 2 * 8
    # top_k >= D: the eigenspace is the whole space, its overlap 1 by construction, and said
    whole = DynamicsState(("eigenspace_overlap",), top_k=5, kernel="traced", targets={})
    for step, k in enumerate(seq):
        last = whole.part(("p", None, None), step, k, None, None)
    assert last.scalars["eigenspace_overlap"] == pytest.approx(1.0, abs=1e-12)
    assert "1 by construction" in last.conventions["eigenspace_overlap"]
    assert "1 by construction" not in state.part(("p", None, None), 3, seq[0], None,
                                                 None).conventions["eigenspace_overlap"]


def test_zero_kernel_gives_missing_dynamics_not_an_error() -> None:
    state = DynamicsState(("target_alignment", "kernel_distance", "eigenspace_overlap_init",
                           "top_eigenvalues"), top_k=2, kernel="traced",
                          targets={"p": Targets(values=np.array([0, 1, 0]), labels=True)})
    out = state.part(("p", None, None), 0, np.zeros((3, 3)), None, None)
    assert math.isnan(out.scalars["target_alignment"])
    assert math.isnan(out.scalars["eigenspace_overlap_init"])
    assert out.arrays["top_eigenvalues"].tolist() == [0.0, 0.0]


# -- JAX and Keras: the same values through their backends ------------------------------


def test_jax_values_against_formulas() -> None:
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):  # the reference in float64, the global setting left as it was
        jax_case(jax)


def jax_case(jax: Any) -> None:
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "w2": jnp.asarray(rng.normal(size=(6, 2)))}

    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    x = rng.normal(size=(10, 4))
    y = rng.normal(size=(10, 2))
    kernels: list[np.ndarray] = []
    with cvcore.Recorder(x, targets=y, dynamics=True, top_k=3, dtype="float64") as rec:
        for step in range(3):
            got = rec.record(step, (apply_fn, params))
            kernels.append(cvcore.ntk((apply_fn, params), x, dtype="float64"))
            f = np.asarray(apply_fn(params, x))
            check_record(got, kernels, list(range(step + 1)), y, f, 3)
            grads = jax.grad(lambda p: jnp.sum((apply_fn(p, x) - y) ** 2))(params)
            params = jax.tree_util.tree_map(lambda a, g: a - 0.05 * g, params, grads)
    assert params["w1"].dtype == np.float64
    assert "real targets" in (got.convention("residual_alignment") or "")


@pytest.mark.slow  # importing Keras and TensorFlow: about 10 s
def test_keras_values_against_formulas() -> None:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(2)])
    x = np.random.default_rng(4).normal(size=(8, 3)).astype("float32")
    y = np.array([0, 1] * 4)
    kernels: list[np.ndarray] = []
    with cvcore.Recorder(x, targets=y, dynamics=True, top_k=2, dtype="float64") as rec:
        for step in range(2):
            got = rec.record(step, model)
            kernels.append(cvcore.ntk(model, x, dtype="float64"))
            f = np.asarray(model(x), dtype=np.float64)
            check_record(got, kernels, list(range(step + 1)), one_hot(y, 2), f, 2, tol=1e-5)
            for w in model.trainable_weights:
                w.assign(w.numpy() * 1.1)
