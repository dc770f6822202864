"""Hugging Face transformers: a ``TrainerCallback`` recording on tokenized text probes.

>>> from cvcore.integrations.huggingface import attach   # doctest: +SKIP
>>> attach(trainer, ["a probe sentence", "another one"], every=50, sink="run.db")  # doctest: +SKIP

The probe texts are tokenized once (padded to the longest, as tensors; a tokenizer
without a pad token, GPT-2's, pads with id 0 under a zero attention mask, which never
enters the kernel), so every record measures the same inputs; each record goes to the
record store and through ``Trainer.log`` to the Trainer's own reporting integrations
(TensorBoard, W&B, MLflow ...) and ``trainer.state.log_history``, as
``cv/<probe set>/<variable>``.

At a recorded step the callback asks the Trainer to log (``control.should_log``), and the
record is taken when that log arrives: its loss is the Trainer's loss of that step (the
mean since the previous log), not an older one. The final step is always recorded.
Graph networks are not transformers models: a graph probe is refused when the callback
is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from cvcore.errors import InputError, describe
from cvcore.integrations.common import PREFIX, is_graph_probe, require, scalars
from cvcore.integrations.recording import record_final
from cvcore.record.probes import ProbeSets
from cvcore.record.recorder import Recorder

INSTALL = "transformers"


def tokenize(probe: Any, tokenizer: Any, max_length: int | None = None) -> Any:
    """Texts (a list of strings, or named sets of them) as the tokenizer's tensors.

    Anything else (an already tokenized dict of tensors, named sets of them) is returned
    as it is.
    """
    if _texts(probe):
        if tokenizer is None:
            raise InputError("expected tokenizer= (or a Trainer with a processing_class) "
                             "to tokenize the probe texts, got none")
        if getattr(tokenizer, "pad_token", None) is None:
            return _padded(tokenizer, list(probe), max_length)
        encoded = tokenizer(list(probe), padding=True, truncation=max_length is not None,
                            max_length=max_length, return_tensors="pt")
        return dict(encoded)
    if isinstance(probe, Mapping) and probe and all(_texts(v) for v in probe.values()):
        return ProbeSets({name: tokenize(texts, tokenizer, max_length)
                          for name, texts in probe.items()})
    if isinstance(probe, str):
        raise InputError(f"expected a list of probe texts, got one string {probe[:30]!r}")
    return probe


def _padded(tokenizer: Any, texts: list[str], max_length: int | None) -> dict[str, Any]:
    """Texts tokenized one by one and padded on the tokenizer's side with id 0 under a zero
    attention mask (for a tokenizer without a pad token)."""
    import torch

    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length,
                        padding=False)
    seqs = [list(ids) for ids in encoded["input_ids"]]
    if any(not s for s in seqs):
        raise InputError("expected every probe text to give at least one token, got none for "
                         f"{texts[next(i for i, s in enumerate(seqs) if not s)]!r}")
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _texts(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(t, str) for t in value))


@cache
def _build() -> type:
    transformers = require("transformers", INSTALL)

    class RecorderCallback(transformers.TrainerCallback):  # type: ignore[misc, name-defined]
        """Records the model's collective variables during ``Trainer.train``.

        Records ``global_step`` 0 (before any update), every optimizer step that is a
        multiple of ``every``, and the final step. At those steps the Trainer is asked to
        log, and the record (with that log's loss) is taken in ``on_log``. Bound to a
        trainer (``trainer=`` or :func:`attach`), the values also go through
        ``trainer.log``.

        Args:
            probe: texts (a list of strings), named sets of texts
                (``{"train": [...], "test": [...]}``), or already tokenized inputs.
            tokenizer: the tokenizer for texts (default: the trainer's
                ``processing_class``).
            max_length: truncate the probe texts to this many tokens.
            trainer: the ``Trainer`` whose ``log`` receives the values.
            prefix: the logged keys' prefix.
            **recorder_options: those of :class:`cvcore.Recorder` (``every``, ``sink``,
                ``subsets``, ``variables``, ``output`` ...).
        """

        def __init__(self, probe: Any, *, tokenizer: Any = None, max_length: int | None = None,
                     trainer: Any = None, prefix: str = PREFIX,
                     **recorder_options: Any) -> None:
            if is_graph_probe(probe):
                raise InputError("expected probe texts or tokenized inputs of a transformers "
                                 "model, got a graph (PyTorch Geometric); transformers models "
                                 "are not graph networks: record those with cvcore.Recorder "
                                 "or the Lightning callback")
            if tokenizer is None and trainer is not None:
                tokenizer = getattr(trainer, "processing_class", None)
            self.trainer, self.prefix = trainer, prefix
            self.recorder = Recorder(tokenize(probe, tokenizer, max_length),
                                     **recorder_options)
            self._pending: int | None = None  # a step waiting for the Trainer's log

        def _record(self, state: Any, model: Any, loss: Any = None,
                    final: bool = False) -> None:
            if model is None:
                raise InputError("expected the Trainer to pass its model to the callback, "
                                 "got none")
            if not state.is_world_process_zero:
                return  # distributed training: the first process writes the store
            step = int(state.global_step)
            record = (record_final(self.recorder, step, model, loss=loss) if final
                      else self.recorder.record(step, model, loss=loss))
            if record is not None and self.trainer is not None:
                values = scalars(record, self.prefix)
                if values:
                    self.trainer.log(dict(values))

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           **kwargs: Any) -> None:
            if state.global_step == 0:
                self._record(state, model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                        **kwargs: Any) -> None:
            step = int(state.global_step)
            if self.recorder.due(step) or step >= state.max_steps:
                control.should_log = True  # the loss of this very step, in on_log
                self._pending = step

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   model: Any = None, **kwargs: Any) -> None:
            if self._pending is None or int(state.global_step) != self._pending \
                    or not logs or "loss" not in logs:
                return  # not the log asked for (the callback's own values, eval metrics)
            self._pending = None
            self._record(state, model, loss=logs["loss"],
                         final=int(state.global_step) >= state.max_steps)

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                         **kwargs: Any) -> None:
            try:
                if model is not None and state.is_world_process_zero:
                    self._pending = None
                    self._record(state, model, final=True)  # when no log carried it
            finally:
                self.recorder.close()

    return RecorderCallback


def attach(trainer: Any, probe: Any, **options: Any) -> Any:
    """A :class:`RecorderCallback` bound to ``trainer`` and added to its callbacks."""
    if not hasattr(trainer, "add_callback") or not hasattr(trainer, "log"):
        raise InputError(f"expected a transformers Trainer, got {describe(trainer)}")
    callback = _build()(probe, trainer=trainer, **options)
    trainer.add_callback(callback)
    return callback


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
