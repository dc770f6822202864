"""The Recorder and the record store: values against independent references, the store's
guarantees (WAL, schema, runs, resume, locks) and every bad input as one clean error."""

from __future__ import annotations

import math
import random
import sqlite3

import numpy as np
import pytest

import cvcore
from cvcore.errors import InputError
from cvcore.record import ProbeSets, RecordStore, StoreError
from cvcore.record.probes import split_probe

torch = pytest.importorskip("torch")


def mlp(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(6, 3)).double()


def reference_kernel(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Traced NTK from explicit per-sample, per-output autograd.grad calls."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    was = model.training
    model.eval()
    for xi in torch.from_numpy(x).double():
        out = model(xi[None])[0]
        per_output = []
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], params, retain_graph=True)
            per_output.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_output))
    model.train(was)
    jac = torch.stack(rows).detach().numpy()  # N × O × P
    return np.einsum("iop,jop->ij", jac, jac) / jac.shape[1]


def entropy_trace(k: np.ndarray) -> tuple[float, float]:
    lam = np.clip(np.linalg.eigvalsh(k), 0, None)
    p = lam[lam > 0] / lam.sum()
    return float(-(p * np.log(p)).sum()), float(np.trace(k))


def probe(n: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4))


def test_whole_probe_matches_autograd_reference(tmp_path):
    model, x = mlp(), probe()
    with cvcore.Recorder(x, sink=tmp_path / "r.db", variables=["entropy", "trace"],
                         dtype="float64") as rec:
        got = rec.record(0, model, loss=torch.tensor(0.25), lr=0.1)
    s, tr = entropy_trace(reference_kernel(model, x))
    assert got.get("entropy") == pytest.approx(s, rel=1e-10)
    assert got.get("trace") == pytest.approx(tr, rel=1e-10)
    assert got.loss == 0.25 and got.extras == {"lr": 0.1}
    stored = RecordStore(tmp_path / "r.db", create=False).records()
    assert stored[0].get("entropy") == got.get("entropy")
    run = cvcore.read_runs(tmp_path / "r.db")[0]
    assert run["model_class"] == "torch.nn.modules.container.Sequential"
    assert run["framework"] == "torch" and run["n_params"] == 4 * 6 + 6 + 6 * 3 + 3
    assert run["probe_sets"] == {"probe": {"n_samples": 12, "subsets": None, "classes": None}}
    assert run["kernel"] == "traced" and run["dtype"] == "float64"
    assert run["cvcore_version"] == cvcore.__version__ and run["closed"] is not None


def test_subsets_are_fixed_and_summarised():
    model, x = mlp(), probe(15)
    rec = cvcore.Recorder(x, subsets=(4, 5), seed=3, variables=["entropy"], dtype="float64")
    first, second = rec.record(0, model), rec.record(1, model)
    per = [v.value for v in first.values if v.subset is not None]
    assert len(per) == 4
    assert per == [v.value for v in second.values if v.subset is not None]  # same subsets
    summary = [v for v in first.values if v.subset is None]
    assert summary[0].value == pytest.approx(np.mean(per), rel=1e-12)
    assert summary[0].std == pytest.approx(np.std(per, ddof=1), rel=1e-12)
    assert summary[0].count == 4
    # the subsets are 4 draws of 5 distinct samples: recompute one by brute force
    index = np.sort(np.random.default_rng([3, 0]).choice(15, size=5, replace=False))
    s, _ = entropy_trace(reference_kernel(model, x[index]))
    assert per[0] == pytest.approx(s, rel=1e-10)


def test_class_wise_and_named_probe_sets():
    model, x = mlp(), probe(10)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    rec = cvcore.Recorder({"train": x, "test": x[:6]}, labels={"train": y},
                          variables=["trace"], dtype="float64")
    got = rec.record(0, model)
    for c in (0, 1, 2):
        _, tr = entropy_trace(reference_kernel(model, x[y == c]))
        assert got.get("trace", "train", label=str(c)) == pytest.approx(tr, rel=1e-10)
    _, tr_test = entropy_trace(reference_kernel(model, x[:6]))
    assert got.get("trace", "test") == pytest.approx(tr_test, rel=1e-10)
    info = rec.store.run(rec.run_id).probe_sets
    assert info["train"]["classes"] == ["0", "1", "2"] and info["test"]["n_samples"] == 6


def test_every_skips_steps():
    rec = cvcore.Recorder(probe(), every=3, variables=["trace"])
    model = mlp()
    results = [rec.record(step, model) for step in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert [r.step for r in rec.records()] == [0, 3, 6]
    assert rec.cost()["count"] == 3 and rec.cost()["total"] > 0


def test_dict_probe_guess():
    x = probe()
    assert list(split_probe({"train": x, "test": x[:3]})) == ["train", "test"]
    assert list(split_probe({"input_ids": x, "mask": x})) == ["probe"]  # one dict of inputs
    assert list(split_probe({"a": x, "b": x[:3]})) == ["a", "b"]  # sizes differ
    assert list(split_probe(ProbeSets(a=x, b=x))) == ["a", "b"]


def test_measure_computes_only_what_is_asked(monkeypatch):
    model, x = mlp(), probe()
    full = cvcore.measure(model, x, dtype="float64")
    calls = []
    real = np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda a: calls.append(a.shape) or real(a))
    some = cvcore.measure(model, x, dtype="float64", variables=["entropy", "trace"])
    assert len(calls) == 1  # no second eigendecomposition for the covariance entropy
    assert some.entropy == full.entropy and some.trace == full.trace
    assert math.isnan(some.covariance_entropy)
    calls.clear()
    again = cvcore.measure(model, x, dtype="float64", variables=["covariance_entropy"])
    assert len(calls) == 2 and again.covariance_entropy == full.covariance_entropy
    calls.clear()
    rec = cvcore.Recorder(x, variables=["entropy"], dtype="float64")
    assert rec.record(0, model).get("entropy") == full.entropy
    assert len(calls) == 1


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
          rec: cvcore.Recorder | None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):
        model.train()
        for idx in torch.randperm(len(x)).split(8):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if rec is not None:  # in the middle of a step: .grad is set, train mode on
                rec.record(epoch, model, loss=loss)
            opt.step()
        _ = np.random.rand(), random.random()


def test_recording_never_changes_training():
    data = torch.from_numpy(probe(32, seed=5))
    labels = torch.arange(32) % 3
    finals = []
    for with_recorder in (False, True):
        torch.manual_seed(11)
        np.random.seed(11)
        random.seed(11)
        model = mlp(seed=2, dropout=0.3)
        rec = cvcore.Recorder({"train": data.numpy(), "test": data.numpy()[:8]},
                              subsets=(2, 4), train=False) if with_recorder else None
        train(model, data, labels, rec)
        finals.append(([p.detach().clone() for p in model.parameters()],
                       torch.rand(3), np.random.rand(), random.random()))
    (p0, t0, n0, r0), (p1, t1, n1, r1) = finals
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert torch.equal(t0, t1) and n0 == n1 and r0 == r1


def test_grad_and_mode_restored():
    model, x = mlp(dropout=0.5), probe()
    model.train()
    model(torch.from_numpy(x)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # recording inside no_grad still works
        cvcore.Recorder(x, variables=["entropy"]).record(0, model)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the store ---------------------------------------------------------------------------


def test_store_is_wal_with_schema_version_and_several_runs(tmp_path):
    path = tmp_path / "runs.db"
    model = mlp()
    for name in ("a", "b"):
        with cvcore.Recorder(probe(), sink=path, name=name, variables=["trace"],
                             tags={"width": 6}) as rec:
            rec.record(0, model)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dict(conn.execute("SELECT key, value FROM meta").fetchall()) == {
        "format": "cvcore-records", "schema_version": "2"}
    runs = cvcore.read_runs(path)
    assert [r["name"] for r in runs] == ["a", "b"] and runs[1]["tags"] == {"width": 6}
    assert runs[0]["id"] != runs[1]["id"]
    with pytest.raises(StoreError, match="holds 2 runs"):
        RecordStore(path, create=False).records()


def test_resume_appends(tmp_path):
    path, model = tmp_path / "r.db", mlp()
    with cvcore.Recorder(probe(), sink=path, name="long", variables=["trace"]) as rec:
        rec.record(0, model)
        first_id = rec.run_id
    with cvcore.Recorder(probe(), sink=path, name="long", resume=True,
                         variables=["trace"]) as rec:
        assert rec.run_id == first_id
        rec.record(1, model)
    store = RecordStore(path, create=False)
    assert [r.step for r in store.records("long")] == [0, 1]
    series = store.series("long", "trace")
    assert series["step"].tolist() == [0, 1] and np.isnan(series["std"]).all()
    assert series["value"].tolist() == [r.get("trace") for r in store.records("long")]
    with pytest.raises(StoreError, match="same probe sets"):
        cvcore.Recorder(probe(5), sink=path, name="long", resume=True, variables=["trace"])


def test_reader_sees_records_while_writer_is_open(tmp_path):
    path, model = tmp_path / "live.db", mlp()
    rec = cvcore.Recorder(probe(), sink=path, variables=["trace"])
    rec.record(0, model)
    rec.record(1, model)
    assert [r.step for r in RecordStore(path, create=False).records()] == [0, 1]
    assert cvcore.read_runs(path)[0]["closed"] is None
    rec.close()


def test_not_a_store(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not one"):
        cvcore.Recorder(probe(), sink=junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="without cvcore's tables"):
        RecordStore(other)
    with pytest.raises(StoreError, match="ending in .db"):
        cvcore.Recorder(probe(), sink=tmp_path / "run.parquet")
    with pytest.raises(StoreError, match="no file"):
        RecordStore(tmp_path / "missing.db", create=False)


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "new.db"
    RecordStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 2 or older, got version 99"):
        RecordStore(path, create=False)


def test_locked_by_another_writer(tmp_path):
    path = tmp_path / "locked.db"
    rec = cvcore.Recorder(probe(), sink=path, variables=["trace"])
    rec.store.conn.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked by another writer"):
        rec.record(0, mlp())
    other.execute("ROLLBACK")
    rec.record(1, mlp())
    rec.close()
    assert [r.step for r in RecordStore(path, create=False).records()] == [1]


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, "every= a positive integer, got 0"),
    ({"subsets": (3, 50)}, "at most 12 samples"),
    ({"subsets": (0, 2)}, "K >= 1"),
    ({"subsets": (2, 2), "labels": np.zeros(12)}, "got both"),
    ({"labels": np.zeros(11)}, "labels of length 12"),
    ({"kernel": "half"}, "kernel 'traced' or 'full'"),
    ({"variables": ["entropi"]}, "variables among"),
    ({"colour": 1}, "measure options among"),
])
def test_bad_options_write_nothing(tmp_path, kwargs, match):
    path = tmp_path / "bad.db"
    with pytest.raises(InputError, match=match):
        cvcore.Recorder(probe(), sink=path, **kwargs)
    assert not path.exists()


def test_probe_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "r.db"
    rec = cvcore.Recorder(np.zeros((5, 7)), sink=path, variables=["trace"])
    with pytest.raises(cvcore.CVCoreError, match="per-sample shape \\(7,\\)") as err:
        rec.record(0, mlp())
    assert "\n" not in str(err.value)
    rec.close()
    assert RecordStore(path, create=False).records() == []


def test_guard_restores_what_a_measurement_could_change():
    from cvcore.capabilities import untouched

    model = mlp(dropout=0.5)
    model.train()
    model(torch.from_numpy(probe())).sum().backward()
    grad = model[0].weight.grad
    state = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    expected = (torch.rand(2), np.random.rand(), random.random())
    torch.random.set_rng_state(state[0]), np.random.set_state(state[1]), random.setstate(state[2])
    with untouched(model):
        torch.rand(5), np.random.rand(5), random.random()
        model.eval()
        model[0].weight.grad = None
        assert torch.is_grad_enabled()
    after = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert model.training and model[0].weight.grad is grad


WRITER = """
import sys, numpy as np, torch, cvcore
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
rec = cvcore.Recorder({"train": x, "test": x[:6]}, sink=sys.argv[1], subsets=(3, 4),
                      variables=["entropy", "trace"])
for step in range(100000):
    rec.record(step, model, loss=1.0 / (step + 1))
    print(step, flush=True)
"""


def test_sigkill_keeps_every_completed_record(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    done = [int(proc.stdout.readline()) for _ in range(8)]
    live = RecordStore(path, create=False).records()  # read while the writer is running
    assert [r.step for r in live[:8]] == done
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    records = RecordStore(path, create=False).records()
    steps = [r.step for r in records]
    assert steps[:len(done)] == done and steps == list(range(len(steps)))
    for r in records:  # every record complete: 2 sets x (3 subsets + summary) x 2 variables
        assert len(r.values) == 16 and r.loss == pytest.approx(1.0 / (r.step + 1))
        assert r.get("entropy", "test") > 0
    assert cvcore.read_runs(path)[0]["closed"] is None


@pytest.mark.parametrize("options", [{"kernel": "traced"}, {"kernel": "full"},
                                     {"kernel": "full", "variables": ["trace", "self_entropy"]}])
def test_subsets_as_union_slices_match_one_call_each(monkeypatch, options):
    from cvcore.record import recorder

    model, x = mlp(), probe(15)
    options = {"variables": ["entropy", "trace", "effective_rank"], **options}
    union = cvcore.Recorder(x, subsets=(5, 4), dtype="float64", **options).record(0, model)
    monkeypatch.setattr(recorder, "UNION_FLOPS", 0.0)
    separate = cvcore.Recorder(x, subsets=(5, 4), dtype="float64", **options)
    got = separate.record(0, model)
    assert separate._union_choice == {"probe": False}
    assert len(union.values) == len(got.values) == 6 * len(options["variables"])
    for a, b in zip(union.values, got.values):
        assert (a.subset, a.variable) == (b.subset, b.variable)
        assert a.value == pytest.approx(b.value, rel=1e-10)


def test_recorder_on_a_jax_model():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def apply_fn(params, x):
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (4, 6)), "w2": jax.random.normal(k2, (6, 3))}
    x = probe(10).astype(np.float32)
    rec = cvcore.Recorder(x, variables=["entropy", "trace"])
    got = rec.record(0, (apply_fn, params))
    info = rec.store.run(rec.run_id)
    assert info.framework == "jax" and info.model_class.endswith("<locals>.apply_fn")
    ref = cvcore.measure((apply_fn, params), x, variables=["entropy", "trace"])
    assert got.get("entropy") == pytest.approx(ref.entropy, rel=1e-6)
    assert got.get("trace") == pytest.approx(ref.trace, rel=1e-6)
    # and by hand: traced kernel from the explicit Jacobian
    jac = jax.jacrev(lambda p: apply_fn(p, x))(params)  # leaves: N × O × ...
    flat = np.concatenate([np.asarray(v).reshape(10, 3, -1) for v in jac.values()], axis=2)
    kernel = np.einsum("iop,jop->ij", flat, flat) / 3
    assert got.get("trace") == pytest.approx(np.trace(kernel), rel=1e-4)


@pytest.mark.parametrize("train_mode", [False, True])
def test_batch_norm_buffers_untouched(train_mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3))
    model.train()
    model(torch.randn(16, 4))  # running statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = cvcore.Recorder(probe().astype(np.float32), variables=["trace"], train=train_mode)
    assert rec.record(0, model).get("trace") > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert before["1.num_batches_tracked"] == after["1.num_batches_tracked"]
