"""Keras 3: a ``keras.callbacks.Callback`` recording on any backend (TensorFlow, JAX, torch).

>>> from cvcore.integrations.keras import RecorderCallback   # doctest: +SKIP
>>> model.fit(x, y, epochs=10, callbacks=[RecorderCallback(x[:100], sink="run.db")])  # doctest: +SKIP

Each epoch's values are added to that epoch's ``logs`` (as ``cv/<probe set>/<variable>``),
so ``History``, ``CSVLogger`` and ``TensorBoard`` listed after this callback receive them.
With ``every > 1`` the epochs that are not recorded get NaN under the same keys, so every
epoch has every key: ``History.history[key][e]`` is epoch ``e``'s, and ``CSVLogger``
(which fixes its columns at the first epoch) keeps every cv column. The model at the end
of training is always recorded.

Keras models are not graph networks (PyTorch Geometric): a graph probe is refused when
the callback is made.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from cvcore.errors import InputError
from cvcore.integrations.common import PREFIX, is_graph_probe, require, scalars
from cvcore.integrations.recording import record_final, scalar_keys
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
        epochs from 0 before the first) and adds them to that batch's ``logs``. Logs of
        epochs (or batches) not recorded get NaN under every key; the final model is
        recorded at the end of training whatever ``every`` says.

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
            if is_graph_probe(probe):
                raise InputError("expected probe inputs of a Keras model (arrays, batch first), "
                                 "got a graph (PyTorch Geometric); Keras models are not graph "
                                 "networks: record those with cvcore.Recorder or the Lightning "
                                 "callback")
            self.unit, self.prefix, self.loss_key = unit, prefix, loss_key
            self.recorder = Recorder(probe, **recorder_options)
            self.keys = scalar_keys(self.recorder, prefix)
            self._step = 0
            self._epoch = 0
            self._last_logs: dict[str, Any] | None = None

        def _record(self, step: int, logs: dict[str, Any] | None, final: bool = False) -> None:
            loss = None if logs is None else logs.get(self.loss_key)
            record = (record_final(self.recorder, step, self.model, loss=loss) if final
                      else self.recorder.record(step, self.model, loss=loss))
            if logs is not None:
                values = {} if record is None else scalars(record, self.prefix)
                logs.update({key: values.get(key, math.nan) for key in self.keys})

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            if self._step == 0:
                self._record(0, None)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._epoch = epoch + 1
            self._last_logs = logs
            if self.unit == "epoch":  # the last epoch's model is recorded into its logs
                self._record(epoch + 1, logs, final=epoch + 1 == self.params.get("epochs"))

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._step += 1
            if self.unit == "batch":
                self._record(self._step, logs)

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            try:
                last = self._last_logs or logs or {}
                step = self._epoch if self.unit == "epoch" else self._step
                record_final(self.recorder, step, self.model, loss=last.get(self.loss_key))
            finally:
                self.recorder.close()

    return RecorderCallback


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
