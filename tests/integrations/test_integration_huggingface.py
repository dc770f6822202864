"""The Hugging Face TrainerCallback: a tiny BERT built from a config and a word-level
tokenizer built here (offline), a real short ``Trainer.train`` with and without the
callback, probes given as text, values in ``Trainer.log`` and in the record store."""

from __future__ import annotations

import numpy as np
import pytest

import cvcore

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from cvcore.integrations.huggingface import RecorderCallback, attach, tokenize
from tests.integration_cli import report_and_plot

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "big", "small", "red", "blue"]
PROBE = ["the cat sat on the mat", "a dog ran fast", "the big red dog", "small blue cat sat",
         "a slow cat"]
VARS = ["entropy", "trace"]


def tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]")


def train(tmp_path, with_callback, every=2):
    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 2, hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16,
                                     num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    g = np.random.default_rng(0)
    texts = [" ".join(g.choice(WORDS, size=int(g.integers(3, 7)))) for _ in range(16)]
    enc = tok(texts, padding="max_length", max_length=8)
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": int(i % 2)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6,
                                          per_device_train_batch_size=4, learning_rate=5e-3,
                                          report_to=[], save_strategy="no", use_cpu=True,
                                          seed=0, logging_steps=3, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   processing_class=tok)
    cb = attach(trainer, PROBE, every=every, sink=tmp_path / "hf.db",
                variables=VARS) if with_callback else None
    trainer.train()
    return model, trainer, cb, tok


def test_trainer_records_logs_and_leaves_training_unchanged(tmp_path):
    model, trainer, _, tok = train(tmp_path, True)
    plain, *_ = train(tmp_path / "plain", False)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    (run,) = cvcore.read_runs(tmp_path / "hf.db")
    assert [r["step"] for r in run["records"]] == [0, 2, 4, 6]
    assert run["model_class"].endswith("BertForSequenceClassification")
    direct = cvcore.measure(model, tokenize(PROBE, tok), variables=VARS)
    final = {v["variable"]: v["value"] for v in run["records"][-1]["values"]}
    assert final["entropy"] == pytest.approx(direct.entropy, rel=1e-12)
    assert final["trace"] == pytest.approx(direct.trace, rel=1e-12)
    logged = {h["step"]: h["cv/probe/trace"] for h in trainer.state.log_history
              if "cv/probe/trace" in h}
    assert sorted(logged) == [0, 2, 4, 6]
    assert logged[6] == pytest.approx(direct.trace, rel=1e-12)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    for record in run["records"][1:]:  # the Trainer's loss of that very step
        assert record["loss"] == pytest.approx(losses[record["step"]], rel=1e-6)
    assert 3 in losses  # the Trainer's own logging_steps still logs
    report_and_plot(tmp_path / "hf.db", tmp_path)


def test_probe_texts_and_errors():
    tok = tokenizer()
    enc = tokenize({"train": PROBE, "test": PROBE[:2]}, tok)
    assert set(enc) == {"train", "test"} and enc["test"]["input_ids"].shape[0] == 2
    assert tokenize(PROBE, tok, max_length=3)["input_ids"].shape == (5, 3)
    with pytest.raises(cvcore.errors.InputError, match="tokenizer="):
        RecorderCallback(PROBE)
    with pytest.raises(cvcore.errors.InputError, match="one string"):
        tokenize("the cat", tok)
    with pytest.raises(cvcore.errors.InputError, match="a transformers Trainer"):
        attach(object(), PROBE, tokenizer=tok)


def gpt2_and_tokenizer(pad: bool):
    vocab = {w: i for i, w in enumerate(["[UNK]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                **({"pad_token": "[UNK]"} if pad else {}))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(WORDS) + 1, n_embd=16, n_layer=1, n_head=2,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), fast


def test_tokenizer_without_pad_token_and_the_final_step(tmp_path):
    model, tok = gpt2_and_tokenizer(pad=False)
    assert tok.pad_token is None
    g = np.random.default_rng(1)
    texts = [" ".join(g.choice(WORDS, size=6)) for _ in range(8)]
    data = [{"input_ids": ids, "labels": ids} for ids in tok(texts)["input_ids"]]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5,
                                          per_device_train_batch_size=2, learning_rate=5e-3,
                                          report_to=[], save_strategy="no", use_cpu=True,
                                          seed=0, logging_steps=10, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   processing_class=tok,
                                   data_collator=transformers.default_data_collator)
    attach(trainer, PROBE, every=2, sink=tmp_path / "gpt2.db", variables=VARS)
    trainer.train()
    (run,) = cvcore.read_runs(tmp_path / "gpt2.db")
    assert [r["step"] for r in run["records"]] == [0, 2, 4, 5]  # 5: the final step
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert [r["loss"] for r in run["records"][1:]] == pytest.approx(
        [losses[2], losses[4], losses[5]], rel=1e-6)
    _, padded = gpt2_and_tokenizer(pad=True)  # the pad id never enters the kernel
    direct = cvcore.measure(model, tokenize(PROBE, padded), variables=VARS)
    final = {v["variable"]: v["value"] for v in run["records"][-1]["values"]}
    assert final["trace"] == pytest.approx(direct.trace, rel=1e-9)
    assert final["entropy"] == pytest.approx(direct.entropy, rel=1e-9)


def test_graph_probe_is_refused_at_construction():
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    graph = Data(x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(cvcore.errors.InputError, match="not graph networks"):
        RecorderCallback(graph, tokenizer=tokenizer())
