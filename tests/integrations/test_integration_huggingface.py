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
    assert run["records"][-1]["loss"] is not None  # the Trainer's last logged loss
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
