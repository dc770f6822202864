"""Language models (transformers, offline): every output against per-sample autograd loops.

The references run each sequence alone, unpadded, and differentiate the chosen output
with ``torch.autograd.grad`` in float64, so they also check that padding (its side, its
token id) never enters the kernel.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cvcore
from cvcore.api import make_request
from cvcore.errors import InputError
from cvcore.sketch import Projection, sketch_statistics, sketched_kernel
from tests.tolerance import rel_error as rel

transformers.logging.set_verbosity_error()
VOCAB = 23
LENGTHS = [6, 4, 2, 5]


def grads_of(outputs: list, params: list) -> torch.Tensor:
    """Rows ``∂out/∂θ`` for every scalar in ``outputs`` (a list of 1-d tensors)."""
    rows = []
    for out in outputs:
        for o in range(out.numel()):
            g = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                   for gi, p in zip(g, params)]))
    return torch.stack(rows)


def traced(rows: torch.Tensor, n: int) -> np.ndarray:
    """``(1/O) Σ_o J_o J_oᵀ`` from rows ordered sample-major."""
    j = rows.reshape(n, -1, rows.shape[1])
    return (torch.einsum("iop,jop->ij", j, j) / j.shape[1]).numpy()


@pytest.fixture(scope="module")
def gpt() -> object:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=12, n_head=2, vocab_size=VOCAB,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def seqs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def padded(seqs: list[torch.Tensor], side: str, pad: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def logits_alone(model, s: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return model(input_ids=s[None]).logits[0]


def reference(model, seqs, output: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    params = [p for p in model.parameters() if p.requires_grad]
    outs = []
    for s in seqs:
        logits = logits_alone(model, s)
        if output == "last":
            outs.append(logits[-1])
        elif output == "positions":
            outs.extend(logits[t] for t in range(len(s)))
        elif output == "next-token":
            outs.append(torch.log_softmax(logits[-2], -1)[s[-1]].reshape(1))
        elif output == "sequence":
            lp = torch.log_softmax(logits[:-1], -1)
            outs.append(lp[torch.arange(len(s) - 1), s[1:]].sum().reshape(1))
    rows = grads_of(outs, params)
    return traced(rows, len(outs))


@pytest.mark.parametrize("output", [None, "last", "next-token", "sequence", "positions"])
def test_causal_lm_outputs_match_unpadded_loops(gpt, seqs, output) -> None:  # type: ignore[no-untyped-def]
    ref = reference(gpt, seqs, output or "last")
    for side, pad in [("right", 0), ("left", 9)]:  # both differ from the unpadded reference
        k = cvcore.ntk(gpt, padded(seqs, side, pad), dtype="float64", output=output)
        assert k.shape == ref.shape
        assert rel(k, ref) < 1e-10, (side, pad)


def test_default_output_is_echoed_in_the_result(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    from cvcore.api import build, make_request

    measured = build(gpt, padded(seqs, "right", 0), request=make_request(dtype="float64"))
    assert measured.output.startswith("language:last (default)")
    chosen = build(gpt, padded(seqs, "right", 0),
                   request=make_request(dtype="float64", output="sequence"))
    assert chosen.output.startswith("language:sequence - ")


def test_two_argument_callable_sees_the_sample_mask(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    def first_after_padding(raw, inputs):  # type: ignore[no-untyped-def]
        start = inputs["attention_mask"].argmax(-1)
        return raw.logits[torch.arange(raw.logits.shape[0]), start]

    params = [p for p in gpt.parameters() if p.requires_grad]
    ref = traced(grads_of([logits_alone(gpt, s)[0] for s in seqs], params), len(seqs))
    k = cvcore.ntk(gpt, padded(seqs, "left", 5), dtype="float64", output=first_after_padding)
    assert rel(k, ref) < 1e-10


def test_causal_logits_over_every_position_are_refused(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="padding included"):
        cvcore.ntk(gpt, padded(seqs, "right", 0), output="logits")
    with pytest.raises(InputError, match="at least 2 tokens"):
        cvcore.ntk(gpt, {"input_ids": torch.tensor([[3, 4], [5, 0]]),
                         "attention_mask": torch.tensor([[1, 1], [1, 0]])}, output="next-token")


@pytest.fixture(scope="module")
def bert_config() -> object:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16,
                                   max_position_embeddings=16, num_labels=3)


@pytest.mark.parametrize("cls, output, pick", [
    ("BertForSequenceClassification", None, lambda o: o.logits[0]),
    ("BertModel", None, lambda o: o.pooler_output[0]),
    ("BertModel", "cls", lambda o: o.last_hidden_state[0, 0]),
])
def test_encoders_match_unpadded_loops(bert_config, seqs, cls, output, pick) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    model = getattr(transformers, cls)(bert_config).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = traced(grads_of([pick(model(input_ids=s[None])) for s in seqs], params), len(seqs))
    for pad in (0, 11):
        k = cvcore.ntk(model, padded(seqs, "right", pad), dtype="float64", output=output)
        assert rel(k, ref) < 1e-10


def test_token_ids_without_a_tokenizer_and_texts_without_one(gpt) -> None:  # type: ignore[no-untyped-def]
    ids = np.random.default_rng(0).integers(1, VOCAB, size=(3, 5))
    k = cvcore.ntk(gpt, ids, dtype="float64", output="next-token")
    ref = reference(gpt, [torch.from_numpy(r) for r in ids], "next-token")
    assert rel(k, ref) < 1e-10
    with pytest.raises(InputError, match="without a saved tokenizer"):
        cvcore.ntk(gpt, np.array(["a text"]))


# --------------------------------------------------------------------------- the sketch


def test_sketch_statistics_by_hand() -> None:
    ks = np.stack([np.diag([1.0, 3.0]), np.diag([3.0, 1.0]), np.diag([2.0, 2.0])])
    st = sketch_statistics(ks)
    np.testing.assert_allclose(st.kernel, 2 * np.eye(2))
    np.testing.assert_allclose(st.entry_stderr, np.diag([1 / np.sqrt(3)] * 2))
    assert st.trace == pytest.approx(4.0) and st.trace_stderr == pytest.approx(0.0)
    assert st.relative_error == pytest.approx(np.sqrt(2 / 3) / np.sqrt(8))


def test_projection_is_unbiased_on_a_linear_map() -> None:
    """``f = W x``: the per-sample Jacobian rows are ``x``, so the sketched kernel of the
    projected outputs is ``x_iᵀx_j · ‖S_kᵀ‖²/O`` per projection, 1 in expectation."""
    proj = Projection(None, 6, seed=3)
    s = proj.matrix(40)
    assert s.shape == (40, 6)
    np.testing.assert_allclose((s * s).sum(axis=0), 1.0)  # each column of ±1/√O has norm 1
    out = proj(np.ones((2, 40)))
    np.testing.assert_allclose(out, np.ones((2, 40)) @ s)


def test_sketch_is_unbiased_and_its_error_is_honest(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    x = padded(seqs, "right", 0)
    exact = cvcore.ntk(gpt, x, dtype="float64")
    request = make_request(dtype="float64", implementation="jacobian")
    estimates, errors = [], []
    for seed in range(10):
        st = sketched_kernel(gpt, x, projections=6, seed=seed, request=request).statistics
        estimates.append(st.kernel)
        errors.append(st.entry_stderr)
    est = np.stack(estimates)
    spread = est.std(axis=0, ddof=1)
    # unbiased: the mean over seeds is within 4 of its reported standard errors, entrywise
    se_of_mean = np.sqrt((np.stack(errors) ** 2).sum(axis=0)) / len(est)
    z = np.abs(est.mean(axis=0) - exact) / se_of_mean
    assert z.max() < 4.0
    # honest: the reported standard error matches the spread over seeds
    ratio = np.mean(errors, axis=0).sum() / spread.sum()
    assert 0.5 < ratio < 1.6
    single = sketched_kernel(gpt, x, projections=64, seed=99, request=request).statistics
    actual = np.linalg.norm(single.kernel - exact) / np.linalg.norm(exact)
    assert actual < 3 * single.relative_error


def test_target_error_adds_projections(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    request = make_request(dtype="float64", implementation="jacobian")
    sk = sketched_kernel(gpt, padded(seqs, "left", 0), target_error=0.05, request=request)
    assert sk.statistics.projections > 8
    assert sk.statistics.relative_error < 0.08
    assert sk.output.startswith("language:last")
    with pytest.raises(InputError, match="projections= or target_error="):
        sketched_kernel(gpt, padded(seqs, "left", 0))


def test_large_vocabulary_advises_the_sketch() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=2000,
                                     n_positions=8, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    from cvcore.adapters.huggingface import HuggingFaceAdapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HuggingFaceAdapter().adapt(model, np.ones((2, 3), np.int64), None)
    assert any("--projections" in str(w.message) for w in caught)


# --------------------------------------------------------------------------- files and the CLI


def run_cli(*args: str):  # type: ignore[no-untyped-def]
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    return CliRunner().invoke(make_app(), list(args))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:  # type: ignore[no-untyped-def]
    """The example's GPT-2 directory (tokenizer included) and its texts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "language_model.py"
    spec = importlib.util.spec_from_file_location("language_model_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("lm")
    directory = module.save_model(out)
    return {"dir": directory, "texts": out / "texts.txt", "lines": module.LINES, "out": out}


def test_cli_measures_a_save_pretrained_directory_on_texts(saved) -> None:  # type: ignore[no-untyped-def]
    import json

    result = run_cli("measure", str(saved["dir"]), "--data", str(saved["texts"]),
                     "--max-length", "4", "--samples", "3", "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["output"].startswith("language:last (default)") and row["n_samples"] == 3
    # the same texts through the saved tokenizer's own padding (left), measured by the API
    model = transformers.AutoModelForCausalLM.from_pretrained(saved["dir"])
    tok = transformers.AutoTokenizer.from_pretrained(saved["dir"])
    index = np.sort(np.random.default_rng(0).choice(len(saved["lines"]), 3, replace=False))
    enc = tok([saved["lines"][i] for i in index], padding=True, truncation=True, max_length=4,
              return_tensors="pt")
    assert tok.padding_side == "left"
    k = cvcore.ntk(model, dict(enc), dtype="float64")
    assert row["trace"] == pytest.approx(float(np.trace(k)), rel=1e-10)


def test_cli_directory_without_tokenizer_takes_token_ids(saved, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved["dir"] / name, bare / name)
    ids = np.random.default_rng(3).integers(2, 10, size=(4, 5))
    np.save(tmp_path / "ids.npy", ids)
    result = run_cli("measure", str(bare), "--data", str(tmp_path / "ids.npy"), "--output",
                     "next-token", "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["output"].startswith("language:next-token") and row["n_outputs"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(saved["dir"]).double()
    ref = reference(model, [torch.from_numpy(r) for r in ids], "next-token")
    assert row["trace"] == pytest.approx(float(np.trace(ref)), rel=1e-9)
    texts = run_cli("measure", str(bare), "--data", str(saved["texts"]))
    assert texts.exit_code == 2 and "without a saved tokenizer" in texts.output


def test_cli_sketch_reports_its_standard_errors(saved) -> None:  # type: ignore[no-untyped-def]
    import json

    result = run_cli("measure", str(saved["dir"]), "--data", str(saved["texts"]),
                     "--projections", "8", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["method"] == "sketched" and row["projections"] == 8
    assert row["trace_stderr"] > 0 and row["entropy_stderr"] > 0 and row["kernel_stderr"] > 0
    assert "sketch: 8 projections" in result.stderr


@pytest.mark.parametrize("cls, config", [
    ("BertForSequenceClassification",
     lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=12, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=3)),
    ("ViTForImageClassification",
     lambda: transformers.ViTConfig(hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16, image_size=8, patch_size=4,
                                    num_labels=3)),
])
def test_model_class_on_a_safetensors_file(tmp_path, cls, config) -> None:  # type: ignore[no-untyped-def]
    """transformers 5 saves renamed keys (ViT's attention): its own loader maps them back."""
    import json
    import shutil

    torch.manual_seed(4)
    model = getattr(transformers, cls)(config()).eval()
    model.save_pretrained(tmp_path / "saved")
    if cls.startswith("ViT"):
        x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    else:
        x = np.random.default_rng(0).integers(1, VOCAB, size=(3, 6))
    np.save(tmp_path / "x.npy", x)
    weights = tmp_path / "saved" / "model.safetensors"
    result = run_cli("measure", str(weights), "--model", f"transformers:{cls}", "--data",
                     str(tmp_path / "x.npy"), "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    k = cvcore.ntk(model, torch.from_numpy(x) if cls.startswith("ViT") else x, dtype="float64")
    assert row["trace"] == pytest.approx(float(np.trace(k)), rel=1e-9)
    assert row["output"].startswith("language:logits (default)")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(weights, alone / "model.safetensors")
    failed = run_cli("measure", str(alone / "model.safetensors"), "--model",
                     f"transformers:{cls}", "--data", str(tmp_path / "x.npy"))
    assert failed.exit_code == 2 and "config.json" in failed.output
    assert "Traceback" not in failed.output and len(failed.output.strip().splitlines()) <= 3


def test_factory_that_needs_arguments_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    np.save(tmp_path / "x.npy", np.zeros((2, 2), np.float32))
    result = run_cli("measure", str(tmp_path / "w.safetensors"), "--model", "torch.nn:Linear",
                     "--data", str(tmp_path / "x.npy"))
    assert result.exit_code == 2 and "with no arguments" in result.output


@pytest.mark.slow
def test_language_example_runs(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "examples" / "language_model.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "language:last (default)" in done.stdout and "sketched (m=16)" in done.stdout
