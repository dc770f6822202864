"""Keras 3: a ``keras.callbacks.Callback`` recording on any backend (TensorFlow, JAX, torch).

>>> from cvcore.integrations.keras import RecorderCallback   # doctest: +SKIP
>>> model.fit(x, y, epochs=10, callbacks=[RecorderCallback(x[:100], sink="run.db")])  # doctest: +SKIP

Each epoch's values are added to that epoch's ``logs`` (as ``cv/<probe set>/<variable>``),
so ``History``, ``CSVLogger`` and ``TensorBoard`` listed after this callback receive them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from cvcore.errors import InputError
from cvcore.integrations.common import PREFIX, require, scalars
from cvcore.record.recorder import Recorder

INSTALL = "keras"
UNITS = ("epoch", "batch")


@cache
def _build() -> type:
    keras = require("keras", INSTALL)

    class RecorderCallback(keras.callbacks.Callback):  # type: ignore[misc, name-defined]
        """Records the model's collective variables during ``model.fit``.

        ``unit="epoch"`` records step 0 (before any update) and the end of every epoch
        ``e`` as step ``e + 1``, adding the values to that epoch's ``logs``;
        ``unit="batch"`` records after every ``every``-th batch (steps counted across
        epochs from 0 before the first) and adds them to that batch's ``logs``.

        Args:
            probe: the fixed probe inputs or named probe sets (as for
                :class:`cvcore.Recorder`).
            unit: ``"epoch"`` or ``"batch"``.
            prefix: the prefix of the keys added to ``logs``.
            loss_key: the ``logs`` key stored as the record's loss.
            **recorder_options: those of :class:`cvcore.Recorder` (``every``, ``sink``,
                ``subsets``, ``variables``, ...).
        """

        def __init__(self, probe: Any, *, unit: str = "epoch", prefix: str = PREFIX,
                     loss_key: str = "loss", **recorder_options: Any) -> None:
            super().__init__()
            if unit not in UNITS:
                raise InputError(f"expected unit= one of {list(UNITS)}, got {unit!r}")
            self.unit, self.prefix, self.loss_key = unit, prefix, loss_key
            self.recorder = Recorder(probe, **recorder_options)
            self._step = 0

        def _record(self, step: int, logs: dict[str, Any] | None) -> None:
            loss = None if logs is None else logs.get(self.loss_key)
            record = self.recorder.record(step, self.model, loss=loss)
            if record is not None and logs is not None:
                logs.update(scalars(record, self.prefix))

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            if self._step == 0:
                self._record(0, None)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.unit == "epoch":
                self._record(epoch + 1, logs)

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._step += 1
            if self.unit == "batch":
                self._record(self._step, logs)

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.recorder.close()

    return RecorderCallback


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
