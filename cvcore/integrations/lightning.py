"""PyTorch Lightning: a ``Callback`` recording every n epochs or steps on fixed probes.

>>> from cvcore.integrations.lightning import RecorderCallback   # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[RecorderCallback(x_probe, sink="run.db")])  # doctest: +SKIP

Each record goes to the record store and, through ``pl_module.log_dict``, to every logger
of the trainer (CSV, TensorBoard, W&B, MLflow) as ``cv/<probe set>/<variable>``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from cvcore.errors import InputError
from cvcore.integrations.common import PREFIX, require, scalars
from cvcore.record.recorder import Recorder
from cvcore.record.store import Record

INSTALL = "lightning"
UNITS = ("epoch", "step")


@cache
def _build() -> type:
    pl = require("lightning.pytorch", INSTALL)

    class RecorderCallback(pl.Callback):  # type: ignore[misc, name-defined]
        """Records the model's collective variables during ``Trainer.fit``.

        ``unit="epoch"`` records step 0 (before any update) and the end of every epoch
        ``e`` as step ``e + 1``; ``unit="step"`` records optimizer steps (``global_step``
        after the update, and 0 before the first). ``every`` counts in that unit.
        Epoch records reach the loggers through ``pl_module.log_dict`` (one value per
        epoch); step 0 and step records through each logger's ``log_metrics`` at their
        exact step (Lightning allows no ``log_dict`` before training, and throttles it
        in batch hooks by ``log_every_n_steps``).

        Args:
            probe: the fixed probe inputs or named probe sets (as for
                :class:`cvcore.Recorder`).
            unit: ``"epoch"`` or ``"step"``.
            log: also hand the values to ``pl_module.log_dict``.
            prefix: the logged keys' prefix.
            loss_key: a ``trainer.callback_metrics`` key to store as the record's loss
                (``"step"`` unit: the training step's returned loss when not given).
            **recorder_options: those of :class:`cvcore.Recorder` (``every``, ``sink``,
                ``subsets``, ``variables``, ...).
        """

        def __init__(self, probe: Any, *, unit: str = "epoch", log: bool = True,
                     prefix: str = PREFIX, loss_key: str | None = None,
                     **recorder_options: Any) -> None:
            super().__init__()
            if unit not in UNITS:
                raise InputError(f"expected unit= one of {list(UNITS)}, got {unit!r}")
            self.unit, self.log, self.prefix, self.loss_key = unit, log, prefix, loss_key
            self.recorder = Recorder(probe, **recorder_options)
            self._last: int | None = None

        def _record(self, step: int, trainer: Any, pl_module: Any, loss: Any = None,
                    direct: bool = False) -> Record | None:
            if step == self._last or not self.recorder.due(step) or not trainer.is_global_zero:
                return None  # one record per step, written by the first process only
            self._last = step
            if self.loss_key is not None:
                loss = trainer.callback_metrics.get(self.loss_key, loss)
            record = self.recorder.record(step, pl_module, loss=loss)
            if record is not None and self.log:
                values = scalars(record, self.prefix)
                if values and direct:
                    for logger in trainer.loggers:
                        logger.log_metrics(values, step=step)
                elif values:
                    pl_module.log_dict(values, on_step=False, on_epoch=True)
            return record

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # Step 0, before any update. Lightning allows no log_dict here, and one in the
            # epoch hooks would be averaged with the end of epoch 0 under the same key:
            # this one record goes to the trainer's loggers directly.
            if trainer.global_step == 0 and trainer.current_epoch == 0:
                self._record(0, trainer, pl_module, direct=True)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.unit == "epoch":
                self._record(trainer.current_epoch + 1, trainer, pl_module)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            if self.unit == "step":
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                # Straight to the loggers at the exact step: log_dict in a batch hook is
                # throttled by log_every_n_steps and re-sends the last value between records.
                self._record(trainer.global_step, trainer, pl_module,
                             loss=None if loss is None else loss.detach(), direct=True)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.recorder.close()

    return RecorderCallback


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
