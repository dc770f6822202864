"""Hugging Face transformers: a ``TrainerCallback`` recording on tokenized text probes.

>>> from cvcore.integrations.huggingface import attach   # doctest: +SKIP
>>> attach(trainer, ["a probe sentence", "another one"], every=50, sink="run.db")  # doctest: +SKIP

The probe texts are tokenized once (padded to the longest, as tensors), so every record
measures the same inputs; each record goes to the record store and through
``Trainer.log`` to the Trainer's own reporting integrations (TensorBoard, W&B, MLflow ...)
and ``trainer.state.log_history``, as ``cv/<probe set>/<variable>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from cvcore.errors import InputError, describe
from cvcore.integrations.common import PREFIX, require, scalars
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
        encoded = tokenizer(list(probe), padding=True, truncation=max_length is not None,
                            max_length=max_length, return_tensors="pt")
        return dict(encoded)
    if isinstance(probe, Mapping) and probe and all(_texts(v) for v in probe.values()):
        return ProbeSets({name: tokenize(texts, tokenizer, max_length)
                          for name, texts in probe.items()})
    if isinstance(probe, str):
        raise InputError(f"expected a list of probe texts, got one string {probe[:30]!r}")
    return probe


def _texts(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(t, str) for t in value))


@cache
def _build() -> type:
    transformers = require("transformers", INSTALL)

    class RecorderCallback(transformers.TrainerCallback):  # type: ignore[misc, name-defined]
        """Records the model's collective variables during ``Trainer.train``.

        Records ``global_step`` 0 (before any update) and every optimizer step that is a
        multiple of ``every``. Bound to a trainer (``trainer=`` or :func:`attach`), the
        values also go through ``trainer.log``.

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
            if tokenizer is None and trainer is not None:
                tokenizer = getattr(trainer, "processing_class", None)
            self.trainer, self.prefix = trainer, prefix
            self.recorder = Recorder(tokenize(probe, tokenizer, max_length),
                                     **recorder_options)

        def _record(self, state: Any, model: Any) -> None:
            if model is None:
                raise InputError("expected the Trainer to pass its model to the callback, "
                                 "got none")
            if not state.is_world_process_zero:
                return  # distributed training: the first process writes the store
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            record = self.recorder.record(int(state.global_step), model, loss=loss)
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
            self._record(state, model)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
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
