"""cv sweep's model families beyond dense and conv: the configs, each family's first record
against an independent kernel, the data, whole sweeps through cv sweep and cv scaling,
and bitwise-equal cells on one worker, two workers and a Dask cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.record import RecordStore
from cvcore.sweep import ConfigError, load_config, parse_config, run_sweep
from cvcore.sweep.cell import run_cell
from cvcore.sweep.families import family_module
from cvcore.sweep.models import initialise

QUICK = Path(__file__).resolve().parents[2] / "examples" / "sweeps" / "families"
FAMILIES = ("vit", "transformer", "ssm", "gnn", "autoencoder", "vae")


def quick(name: str, **replace: str) -> str:
    text = (QUICK / f"{name}-quick.toml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def kernel_reference(fn, x) -> tuple[float, float]:
    """(entropy, trace) of the traced NTK of ``fn`` on ``x``: explicit per-sample,
    per-output autograd loops, float64 eigenvalues."""
    params = [p for p in fn.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = fn(x[i:i + 1])[0].reshape(-1)
        per_output = []
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params, strict=True)]).double())
        rows.append(torch.stack(per_output))
    jac = torch.stack(rows)
    kernel = torch.einsum("iop,jop->ij", jac, jac).numpy() / jac.shape[1]
    lam = np.clip(np.linalg.eigvalsh(kernel), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()), float(np.trace(kernel))


def test_every_quick_config_is_valid_and_small():
    from cvcore.sweep import budget

    names = {p.stem for p in QUICK.glob("*.toml")}
    assert {f"{f}-quick" for f in (*FAMILIES, "rl")} <= names
    for path in QUICK.glob("*.toml"):
        cfg = load_config(path)
        shape = budget.check_data(cfg)
        seconds = sum(budget.cell_seconds(cfg, c, shape) for c in cfg.cells())
        limit = 60 if path.stem.endswith("-quick") else 2 * 30 * 60  # 30 min on 2 cores
        assert seconds < limit, (path.stem, seconds)


@pytest.mark.parametrize(("text", "message"), [
    ('[model]\nfamily = "vit"\nwidth = 4\ndepth = 1\npatch = 3\n', "patch: expected one of 2, 4, got 3"),
    ('[model]\nfamily = "gnn"\nwidth = 4\ndepth = 1\nconv = "gat"\n', "conv: expected one of gcn, gin"),
    ('[model]\nfamily = "transformer"\nwidth = 4\ndepth = 1\nstate = 3\n',
     "[model] state: expected a parameter of the transformer family among width, depth, heads"),
    ('[model]\nfamily = "ssm"\nwidth = 4\ndepth = 1\n[data]\ndataset = "karate"\n',
     "[data] dataset: expected one of text, digits for the ssm family, got 'karate'"),
    ('[model]\nfamily = "transformer"\nwidth = 4\ndepth = 1\nheads = 0\n',
     "heads: expected positive integers, got 0"),
])
def test_family_config_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text, where="c.toml")
    assert message in str(info.value)


def test_defaults_per_family():
    cfg = parse_config('[model]\nfamily = "transformer"\nwidth = 4\ndepth = 1\n')
    assert cfg.data.dataset == "text" and cfg.train.loss == "cross_entropy"
    ae = parse_config('[model]\nfamily = "vae"\nwidth = 4\ndepth = 1\n')
    assert (ae.data.dataset, ae.train.loss) == ("digits", "mse")
    assert parse_config('[model]\nfamily = "gnn"\nwidth = 4\ndepth = 1\n').data.dataset == "karate"


def test_corpus_tokens_and_windows():
    from cvcore.sweep.families import sequence

    assert list(sequence.tokens("a\tZ\n~é")) == [65, 0, 58, 95, 94, 31, 31]  # é: 2 bytes → ?
    text = sequence.corpus_text()
    assert len(text) > 50_000 and "Return" in text
    cfg = parse_config(quick("transformer"))
    tr, te, facts = sequence.windows(cfg.data, 16)
    assert tr.shape == (200, 17) and te.shape == (100, 17)
    assert facts["corpus_chars"] == len(text)
    ids = sequence.tokens(text)
    # every window is a stretch of the corpus, and train and test windows differ
    starts = {tuple(ids[i:i + 17]) for i in range(0, ids.size - 16, 17)}
    assert all(tuple(w) in starts for w in tr[:20]) and not {tuple(w) for w in tr} & {
        tuple(w) for w in te}


@pytest.mark.slow
def test_the_corpus_is_the_same_whatever_the_process_imported():
    """A process that imported Keras once read other docstrings (Keras changes one that
    ``collections`` inherits), so the 1-worker and 2-worker runs of one cell trained on
    different texts. The corpus is read in a fresh interpreter: the same text here, in a
    process that imported Keras, and in one that imported nothing else."""
    import hashlib
    import subprocess
    import sys

    from cvcore.sweep.families import sequence

    def digest(setup: str) -> str:
        code = (f"{setup}from cvcore.sweep.families.sequence import corpus_text; "
                "import hashlib, sys; "
                "sys.stdout.write(hashlib.sha256(corpus_text().encode()).hexdigest())")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    here = hashlib.sha256(sequence.corpus_text().encode()).hexdigest()
    assert digest("import keras; ") == here == digest("")


def test_graph_data():
    from cvcore.sweep.families import graphs

    adjacency, labels = graphs.karate()
    assert adjacency.shape == (34, 34) and adjacency.sum() == 2 * 78
    assert (labels == 0).sum() == 17  # Mr. Hi's club
    rows, y = graphs.benchmark(0)
    assert rows.shape == (400, 16, 19) and y.mean() == 0.5
    n_edges = rows[:, :, :16].sum(axis=(1, 2)) / 2
    n = rows[:, :, 18].sum(axis=1)
    density = n_edges / (n * (n - 1) / 2)
    assert abs(density[y == 0].mean() - 0.25) < 0.01 and abs(density[y == 1].mean() - 0.35) < 0.01
    np.testing.assert_array_equal(graphs.benchmark(0)[0], rows)  # seeded


def _rebuilt(cfg, cell):
    """The cell's untrained model, rebuilt here from its seed as the cell builds it."""
    params, recipe, seed = cfg.resolve(cell)
    torch.manual_seed(seed)
    module = family_module(cfg.family)
    task = module.task(cfg, params, recipe, seed)
    model = module.build(params, task)
    initialise(model, recipe.init)
    return model.eval(), task


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cell_records_the_kernel_of_the_model_it_trains(tmp_path, family):
    extra = {"[probe]\ntrain = 16\ntest = 16": "[probe]\ntrain = 5\ntest = 4"}
    if family == "gnn":
        extra = {"[probe]\ntrain = 12\ntest = 10": "[probe]\ntrain = 5\ntest = 4"}
    cfg = parse_config(quick(family, **extra))
    cell = cfg.cells()[-1]
    status = run_cell(cfg, cell, tmp_path)
    assert status["status"] == "done", status.get("traceback")
    model, task = _rebuilt(cfg, cell)
    assert status["n_params"] == sum(p.numel() for p in model.parameters())
    with RecordStore(tmp_path / "cells" / f"{cell.id}.db", create=False) as store:
        records = store.records(None)
    assert [r.step for r in records] == list(range(len(records)))
    first, last = records[0], records[-1]
    for name, x in task.probe.items():
        fn = model
        if name.startswith("latent_"):  # the code, read off the encoder directly
            class Code(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.m = model

                def forward(self, z):
                    return self.m.posterior(z[:, :64])[0]
            fn = Code()
        entropy, trace = kernel_reference(fn, x)
        assert first.get("entropy", name) == pytest.approx(entropy, rel=2e-4), name
        assert first.get("trace", name) == pytest.approx(trace, rel=2e-4), name
    assert last.get("entropy", "train") != first.get("entropy", "train")  # it trained
    with torch.no_grad():
        assert first.loss == pytest.approx(task.evaluate(model)["train_loss"], rel=1e-5)


def test_an_rl_cell_records_actor_and_critic_kernels_and_the_reward(tmp_path):
    pytest.importorskip("stable_baselines3")
    from cvcore.sweep.families import rl

    cfg = parse_config(quick("rl", **{"train = 16\ntest = 16": "train = 6\ntest = 6"}))
    cell = cfg.cells()[0]
    status = run_cell(cfg, cell, tmp_path)
    assert status["status"] == "done", status.get("traceback")
    params, recipe, seed = cfg.resolve(cell)
    agent = rl.make_agent(params, recipe, seed)  # the untrained agent, independently
    policy = agent.policy.eval()
    obs = torch.from_numpy(rl.observations(6, cfg.data.seed))

    class Actor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = policy

        def forward(self, o):
            return self.p.action_net(self.p.mlp_extractor.forward_actor(
                self.p.extract_features(o, self.p.features_extractor)))

    class Critic(Actor):
        def forward(self, o):
            return self.p.predict_values(o)

    with RecordStore(tmp_path / "cells" / f"{cell.id}.db", create=False) as store:
        records = store.records(None)
    assert [r.step for r in records] == [0, 1, 2]
    for name, fn in (("actor", Actor()), ("critic", Critic())):
        entropy, trace = kernel_reference(fn, obs)
        assert records[0].get("entropy", name) == pytest.approx(entropy, rel=2e-4)
        assert records[0].get("trace", name) == pytest.approx(trace, rel=2e-4)
    rewards = [r.extras["episode_reward"] for r in records]
    assert all(8 <= r <= 500 for r in rewards)
    reward, critic_loss = rl.evaluation(agent)
    assert rewards[0] == pytest.approx(reward)
    assert records[0].loss == pytest.approx(critic_loss, rel=1e-6)
    # the critic loss by hand on the first episode alone is of the same size: returns
    # of a CartPole episode of T steps are (1 - γ^(T-t)) / (1 - γ) and the untrained
    # values are near 0, so the loss is near the mean squared return
    assert 1 < records[0].loss < 1 / (1 - agent.gamma) ** 2
    assert status["n_params"] == sum(p.numel() for p in policy.parameters())


def _series(root: Path, cell_id: str, probe: str) -> np.ndarray:
    with RecordStore(root / "cells" / f"{cell_id}.db", create=False) as s:
        return s.series(None, "entropy", probe_set=probe)["value"]


@pytest.mark.slow
def test_transformer_sweep_bitwise_on_one_and_two_workers_and_cv_scaling(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.toml"
    path.write_text(quick("transformer", **{"seed = [0]": "seed = [0, 1]"}))
    runner = CliRunner()
    for workers in ("1", "2"):
        res = runner.invoke(make_app(), ["sweep", str(path), "--out", str(tmp_path / workers),
                                         "--workers", workers])
        assert res.exit_code == 0, res.output
    cfg = load_config(path)
    for cell in cfg.cells():
        for probe in ("train", "test"):
            np.testing.assert_array_equal(_series(tmp_path / "1", cell.id, probe),
                                          _series(tmp_path / "2", cell.id, probe))
    res = runner.invoke(make_app(), ["scaling", str(tmp_path / "2"), "--boot", "20"])
    assert res.exit_code == 0, res.output
    analysis = json.loads((tmp_path / "2" / "scaling" / "scaling.json").read_text())
    points = analysis["probe_sets"]["train"]["points"]
    assert sorted(p["params"]["width"] for p in points) == [4, 16]
    assert all(len(p["seeds"]) == 2 for p in points)


@pytest.mark.slow
def test_gnn_sweep_bitwise_on_dask_and_here(tmp_path):
    distributed = pytest.importorskip("distributed")
    cfg = parse_config(quick("gnn"))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        summary = run_sweep(cfg, tmp_path / "dask", engine="dask", workers=2,
                            scheduler=cluster.scheduler_address, progress=None)
    assert (summary["done"], summary["failed"]) == (4, 0)
    for cell in cfg.cells()[:2]:
        run_cell(cfg, cell, tmp_path / "here")
        for probe in ("train", "test"):
            np.testing.assert_array_equal(_series(tmp_path / "dask", cell.id, probe),
                                          _series(tmp_path / "here", cell.id, probe))


def test_autoencoder_sweep_is_analysed_on_its_latent_probe(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "a.toml"
    path.write_text(quick("autoencoder"))
    runner = CliRunner()
    res = runner.invoke(make_app(), ["sweep", str(path), "--out", str(tmp_path / "s"),
                                     "--workers", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(make_app(), ["scaling", str(tmp_path / "s"), "--boot", "10",
                                     "--probe", "latent_train", "--probe", "train"])
    assert res.exit_code == 0, res.output
    analysis = json.loads((tmp_path / "s" / "scaling" / "scaling.json").read_text())
    assert set(analysis["probe_sets"]) == {"latent_train", "train"}
