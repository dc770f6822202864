"""PyTorch Lightning: a ``Callback`` recording every n epochs or steps on fixed probes.

>>> from cvcore.integrations.lightning import RecorderCallback   # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[RecorderCallback(x_probe, sink="run.db")])  # doctest: +SKIP

Each record goes to the record store and, through ``pl_module.log_dict``, to every logger
of the trainer (CSV, TensorBoard, W&B, MLflow) as ``cv/<probe set>/<variable>``.

The measured model is the ``LightningModule`` (called through its ``forward``), or one of
its submodules, ``submodule="net"``; a module without ``forward`` and no ``submodule=`` is
refused before the first step, naming its submodules. The model at the end of training is
always recorded; a run that fails is closed. Graph networks (PyTorch Geometric layers in
the module) record on graph probes like any model: a ``Data`` graph, ``(Data, nodes)``,
a list of ``Data``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from cvcore.errors import InputError
from cvcore.integrations.common import PREFIX, require, scalars
from cvcore.integrations.recording import record_final
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
            submodule: measure this submodule of the ``LightningModule`` (a name for
                ``get_submodule``, e.g. ``"net"`` or ``"model.encoder"``) instead of the
                module itself.
            log: also hand the values to ``pl_module.log_dict``.
            prefix: the logged keys' prefix.
            loss_key: a ``trainer.callback_metrics`` key to store as the record's loss
                (``"step"`` unit: the training step's returned loss when not given).
            **recorder_options: those of :class:`cvcore.Recorder` (``every``, ``sink``,
                ``subsets``, ``variables``, ...).
        """

        def __init__(self, probe: Any, *, unit: str = "epoch", log: bool = True,
                     prefix: str = PREFIX, loss_key: str | None = None,
                     submodule: str | None = None, **recorder_options: Any) -> None:
            super().__init__()
            if unit not in UNITS:
                raise InputError(f"expected unit= one of {list(UNITS)}, got {unit!r}")
            if submodule is not None and (not isinstance(submodule, str) or not submodule):
                raise InputError(f"expected submodule= a submodule's name, got {submodule!r}")
            self.unit, self.log, self.prefix, self.loss_key = unit, log, prefix, loss_key
            self.submodule = submodule
            self.recorder = Recorder(probe, **recorder_options)
            self._last: int | None = None

        def measured(self, pl_module: Any) -> Any:
            """The module measured: ``pl_module`` or its ``submodule``."""
            if self.submodule is None:
                if type(pl_module).forward is pl.LightningModule.forward:
                    names = [n for n, _ in pl_module.named_children()]
                    raise InputError(f"expected a LightningModule with forward(), or "
                                     f"submodule= naming the network to measure (one of "
                                     f"{names}), got {type(pl_module).__name__} without "
                                     "forward()")
                return pl_module
            try:
                return pl_module.get_submodule(self.submodule)
            except AttributeError:
                names = [n for n, _ in pl_module.named_modules() if n]
                raise InputError(f"expected submodule= one of {names[:12]}, got "
                                 f"{self.submodule!r}") from None

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.measured(pl_module)  # before the first step: a module it can measure

        def _record(self, step: int, trainer: Any, pl_module: Any, loss: Any = None,
                    direct: bool = False, final: bool = False) -> Record | None:
            if step == self._last or not (final or self.recorder.due(step)) \
                    or not trainer.is_global_zero:
                return None  # one record per step, written by the first process only
            self._last = step
            if self.loss_key is not None:
                loss = trainer.callback_metrics.get(self.loss_key, loss)
            model = self.measured(pl_module)
            record = (record_final(self.recorder, step, model, loss=loss) if final
                      else self.recorder.record(step, model, loss=loss))
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
            if self.unit == "epoch":  # the last epoch is recorded whatever every= says
                self._record(trainer.current_epoch + 1, trainer, pl_module,
                             final=trainer.current_epoch + 1 == trainer.max_epochs)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            if self.unit == "step":
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                # Straight to the loggers at the exact step: log_dict in a batch hook is
                # throttled by log_every_n_steps and re-sends the last value between records.
                self._record(trainer.global_step, trainer, pl_module,
                             loss=None if loss is None else loss.detach(), direct=True)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            # the final model, when no epoch or step record took it (max_steps, every=)
            step = trainer.current_epoch if self.unit == "epoch" else trainer.global_step
            if trainer.is_global_zero:
                self._record(step, trainer, pl_module, direct=True, final=True)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.recorder.close()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.recorder.close()  # the run is marked finished with what it recorded

    return RecorderCallback


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
