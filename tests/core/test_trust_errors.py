"""Mistakes and edge cases that used to end in a traceback or a misleading line: checkpoint
steps beyond what the store holds, bad steps and losses given to the Recorder, models
whose kernel is zero, every Hugging Face output on every kind of head, transformers'
shape-mismatch refusal, and allocations that fail mid-way."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

import cvcore
from cvcore.errors import InputError, KernelError
from cvcore.record import RecordStore

torch = pytest.importorskip("torch")

runner = CliRunner()


def invoke(*args: object) -> Any:
    return runner.invoke(make_app(), [str(a) for a in args])


def one_line_refusal(result: Any) -> str:
    """The stderr of a refused command: exit status 2, one line, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def small_mlp(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


# -- 1. checkpoint steps beyond 2^63 ------------------------------------------------------

def test_checkpoint_step_beyond_int64_is_refused_before_anything_is_written(tmp_path: Path
                                                                            ) -> None:
    model = small_mlp()
    torch.save(model, tmp_path / "ckpt_1.pt")
    huge = tmp_path / "ckpt_99999999999999999999.pt"
    torch.save(model, huge)
    db = tmp_path / "run.db"
    line = one_line_refusal(invoke("measure", tmp_path / "ckpt_1.pt", huge, "--data", "digits",
                                   "--samples", "5", "--out", db, "-q"))
    assert "ckpt_99999999999999999999.pt" in line and "99999999999999999999" in line
    assert "2^63" in line
    assert not db.exists()  # refused before the first checkpoint was measured

    largest = tmp_path / "ckpt_9223372036854775807.pt"  # 2^63 - 1 still fits
    torch.save(model, largest)
    ok = invoke("measure", largest, "--data", "digits", "--samples", "5", "--out", db, "-q")
    assert ok.exit_code == 0, ok.output
    assert [r.step for r in RecordStore(db, create=False).records()] == [2**63 - 1]


# -- 2. bad steps and losses given to the Recorder -----------------------------------------

@pytest.mark.parametrize("step, loss, words", [
    (2**63, None, "got 9223372036854775808"),
    (-1, None, "got -1"),
    (1.5, None, "got float"),
    (np.int64(3), torch.ones(3), "3 elements"),
    (4, np.ones((2, 2)), "4 elements"),
    (5, "0.3", "got str"),
    (6, True, "got bool"),
], ids=["2^63", "negative", "float", "torch-vector", "numpy-matrix", "text", "bool"])
def test_recorder_refuses_bad_steps_and_losses_before_writing(tmp_path: Path, step: Any,
                                                              loss: Any, words: str) -> None:
    x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    model = small_mlp()
    db = tmp_path / "run.db"
    with cvcore.Recorder(x, sink=db, variables=["trace"]) as rec:
        rec.record(0, model, loss=0.5)
        with pytest.raises(InputError) as info:
            rec.record(step, model, loss=loss)
        assert words in str(info.value) and "\n" not in str(info.value)
        assert [r.step for r in rec.records()] == [0]  # nothing written
        rec.record(10, model, loss=0.25)  # the store is still valid and takes records
    records = RecordStore(db, create=False).records()
    assert [(r.step, r.loss) for r in records] == [(0, 0.5), (10, 0.25)]


def test_nan_loss_is_recorded_as_missing(tmp_path: Path) -> None:
    """A NaN loss (a diverged step) is worth recording: the record is written, its loss
    stored as missing (NULL, read back as None), its variables as measured."""
    x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    model = small_mlp()
    db = tmp_path / "run.db"
    with cvcore.Recorder(x, sink=db, variables=["trace"]) as rec:
        rec.record(0, model, loss=float("nan"))
        rec.record(1, model, loss=torch.tensor(float("nan")))
    records = RecordStore(db, create=False).records()
    assert [r.loss for r in records] == [None, None]
    expected = float(np.trace(cvcore.ntk(model, x)))
    assert [r.get("trace") for r in records] == pytest.approx([expected] * 2, rel=1e-5)


# -- 3. a model whose kernel is zero -----------------------------------------------------

class ConstantOutput(torch.nn.Module):
    """``0 · f(x)``: every parameter has a zero gradient, so the kernel is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:
        return 0 * self.linear(x)


@pytest.mark.parametrize("variables, subsets", [(None, None), (["trace"], None),
                                                (["entropy", "trace"], (2, 3))],
                         ids=["all", "trace-only", "subsets"])
def test_zero_kernel_is_recorded_with_trace_zero_and_a_note(tmp_path: Path, variables: Any,
                                                            subsets: Any) -> None:
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    model = ConstantOutput()
    with pytest.raises(KernelError, match="trace 0 .* the entropy is undefined"):
        cvcore.measure(model, x)  # the API refuses; the Recorder records what is defined
    db = tmp_path / "run.db"
    with warnings.catch_warnings(record=True) as caught, \
            cvcore.Recorder(x, sink=db, variables=variables, subsets=subsets) as rec:
        warnings.simplefilter("always")
        rec.record(0, model, loss=1.0)
        rec.record(1, model, loss=0.9)  # training goes on; one warning for the run
    zero = [w for w in caught if "zero kernel" in str(w.message)]
    assert len(zero) == 1 and zero[0].category is RuntimeWarning
    records = RecordStore(db, create=False).records()
    assert [r.step for r in records] == [0, 1]
    for record in records:
        assert record.get("trace") == 0.0
        assert "entropy is undefined" in record.extras["cvcore_note"]
        if variables is None or "entropy" in variables:
            assert math.isnan(record.get("entropy"))
        if variables is None:
            assert record.get("normalized_trace") == 0.0
            assert math.isnan(record.get("effective_rank"))
            assert math.isnan(record.get("self_entropy"))
        if subsets is not None:
            assert "subset 0" in record.extras["cvcore_note"]


def test_recorder_keeps_its_note_key_for_itself() -> None:
    x = np.zeros((3, 64), dtype=np.float32)
    with cvcore.Recorder(x, variables=["trace"]) as rec, \
            pytest.raises(InputError, match="cvcore_note"):
        rec.record(0, small_mlp(), cvcore_note="mine")


# -- 4. Hugging Face: every output on every head ------------------------------------------

VOCAB = 23
#: The outputs each head gives (the others are refused in one line).
SUPPORTED = {
    "BertModel": ["last", "positions", "pooled", "cls"],
    "BertForSequenceClassification": ["logits"],
    "BertForMaskedLM": ["last", "positions", "next-token", "sequence"],
    "GPT2Model": ["last", "positions", "cls"],
    "GPT2LMHeadModel": ["last", "positions", "next-token", "sequence"],
    "GPT2ForSequenceClassification": ["logits"],
}
OUTPUTS = ["last", "positions", "next-token", "sequence", "pooled", "cls", "logits"]
_MODELS: dict[str, Any] = {}


def hf_model(name: str) -> Any:
    """A tiny randomly initialised model of class ``name`` (float64, eval mode)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    if name not in _MODELS:
        if name.startswith("Bert"):
            config = transformers.BertConfig(
                vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=8, max_position_embeddings=8, num_labels=3)
        else:
            config = transformers.GPT2Config(
                n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=8, num_labels=3,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)
        torch.manual_seed(0)
        _MODELS[name] = getattr(transformers, name)(config).double().eval()
    return _MODELS[name]


def reference_trace(model: Any, ids: np.ndarray, kind: str) -> float:
    """``Σ_samples (1/O) Σ_o |∂f_o/∂θ|²``, each sequence run alone through the model and
    differentiated with ``torch.autograd.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for row in ids:
        s = torch.as_tensor(row)
        raw = model(input_ids=s[None])
        logits = getattr(raw, "logits", None)
        hidden = logits if logits is not None else raw.last_hidden_state
        if kind == "last":
            outs = [hidden[0, -1]]
        elif kind == "positions":
            outs = [hidden[0, t] for t in range(len(s))]
        elif kind == "next-token":
            outs = [torch.log_softmax(logits[0, -2], -1)[s[-1]].reshape(1)]
        elif kind == "sequence":
            lp = torch.log_softmax(logits[0, :-1], -1)
            outs = [lp[torch.arange(len(s) - 1), s[1:]].sum().reshape(1)]
        elif kind == "pooled":
            outs = [raw.pooler_output[0]]
        elif kind == "cls":
            outs = [raw.last_hidden_state[0, 0]]
        else:
            outs = [logits[0]]
        for out in outs:
            for o in range(out.numel()):
                grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
                total += sum(float((g ** 2).sum()) for g in grads if g is not None) / out.numel()
    return total


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("head", list(SUPPORTED))
def test_every_output_on_every_head_works_or_is_one_line(head: str, output: str) -> None:
    model = hf_model(head)
    ids = np.random.default_rng(2).integers(1, VOCAB, size=(2, 4))
    if output in SUPPORTED[head]:
        kernel = cvcore.ntk(model, ids, output=output, dtype="float64")
        assert float(np.trace(kernel)) == pytest.approx(reference_trace(model, ids, output),
                                                        rel=1e-8)
        return
    with pytest.raises(InputError) as info:
        cvcore.ntk(model, ids, output=output, dtype="float64")
    message = str(info.value)
    assert "\n" not in message
    assert f"got {output!r}" in message and head in message
    assert f"expected output among {SUPPORTED[head]}" in message


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    hf_model("GPT2LMHeadModel").save_pretrained(out / "gpt2")
    np.save(out / "ids.npy", np.random.default_rng(3).integers(1, VOCAB, size=(3, 4)))
    return out


def test_cli_output_a_head_lacks_is_one_line(saved_gpt2: Path) -> None:
    line = one_line_refusal(invoke("measure", saved_gpt2 / "gpt2", "--data",
                                   saved_gpt2 / "ids.npy", "--output", "cls"))
    assert "got 'cls'" in line and "GPT2LMHeadModel" in line
    assert "['last', 'positions', 'next-token', 'sequence']" in line
    ok = invoke("measure", saved_gpt2 / "gpt2", "--data", saved_gpt2 / "ids.npy", "--output",
                "sequence", "--dtype", "float64", "--json", "-q")
    assert ok.exit_code == 0, ok.output
    (row,) = json.loads(ok.stdout)
    ids = np.load(saved_gpt2 / "ids.npy")
    assert row["trace"] == pytest.approx(
        reference_trace(hf_model("GPT2LMHeadModel"), ids, "sequence"), rel=1e-8)


def test_shape_mismatch_names_the_tensors(tmp_path: Path) -> None:
    """transformers' refusal points to a load report it logs (never shown); the line
    names the tensors and both shapes instead."""
    directory = tmp_path / "bert"
    hf_model("BertForSequenceClassification").save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 12  # the saved weights have 8
    (directory / "config.json").write_text(json.dumps(config))
    np.save(tmp_path / "ids.npy", np.ones((2, 4), dtype=np.int64))
    line = one_line_refusal(invoke("measure", directory, "--data", tmp_path / "ids.npy"))
    assert "above report" not in line
    assert "intermediate.dense.weight (8, 8) in the weights vs (12, 8) in config.json" in line
    assert "3 weight tensors" in line


# -- 5. allocations that fail mid-way ------------------------------------------------------

@pytest.mark.parametrize("raised, needed", [
    (MemoryError(), "the 20 × 20 kernel alone needs at least"),
    (MemoryError("Unable to allocate 3.46 GiB for an array with shape (21564, 21564)"),
     "Unable to allocate 3.46 GiB"),
], ids=["bare", "numpy"])
def test_failed_allocation_is_one_line_with_the_budget_and_options(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: BaseException,
        needed: str) -> None:
    from cvcore import runs

    torch.save(small_mlp(), tmp_path / "model.pt")

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(runs, "collective_variables", out_of_memory)
    csv = tmp_path / "rows.csv"
    line = one_line_refusal(invoke("measure", tmp_path / "model.pt", "--data", "digits",
                                   "--samples", "20", "--memory-budget", "64MB", "--kernel", "full",
                                   "--csv", csv))
    assert "allocation failure" in line and needed in line
    assert "budget of 64 MiB (--memory-budget)" in line and "available" in line
    for option in ("--samples", "--kernel traced", "--method stochastic", "--variables trace",
                   "--memory-budget"):
        assert option in line
    assert not csv.exists()


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cvcore import runs

    torch.save(small_mlp(), tmp_path / "model.pt")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(runs, "collective_variables", broken)
    result = invoke("measure", tmp_path / "model.pt", "--data", "digits", "--samples", "5")
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"


def test_kernel_too_large_names_every_way_out() -> None:
    with pytest.raises(cvcore.ResourceError) as info:
        cvcore.ntk(torch.nn.Linear(8, 20000), torch.randn(2000, 8), kernel="full")
    message = str(info.value)
    assert "needing about" in message and "GiB available" in message
    assert "--memory-budget bounds only the Jacobian blocks" in message
    for option in ("--samples", "--kernel traced", "--method stochastic", "--variables trace"):
        assert option in message


@pytest.mark.parametrize("method", ["ntk", "diagonal"])
def test_python_api_turns_a_failed_allocation_into_one_resource_error(
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The API's counterpart of the CLI's handling: the backend's allocation fails mid-way."""
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.errors import ResourceError

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError()

    monkeypatch.setattr(TorchBackend, method, out_of_memory)
    x = torch.randn(12, 64)
    call = (lambda: cvcore.ntk(small_mlp(), x, memory_budget="64MB")) if method == "ntk" else (
        lambda: cvcore.measure(small_mlp(), x, variables="trace"))
    with pytest.raises(ResourceError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and "allocation failure" in text
    assert "12 × 12 kernel alone needs at least" in text and "--samples" in text


def test_python_api_keeps_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from cvcore.backends.torch.backend import TorchBackend

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(TorchBackend, "ntk", broken)
    with pytest.raises(RuntimeError, match="^a bug$"):
        cvcore.ntk(small_mlp(), torch.randn(4, 64))
