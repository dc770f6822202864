"""TensorBoard scalars straight from the Recorder, for loops without a trainer.

``cvcore.Recorder(probe, tensorboard="runs/tb")`` writes every record's summary values as
scalars ``cv/<probe set>/<variable>`` (and ``cv/loss``) at the record's step, beside the
record store. The writer is ``tensorboardX``: it needs only NumPy and protobuf, where
``torch.utils.tensorboard`` needs the ``tensorboard`` package (a web server and its
dependencies) and ``tf.summary`` needs TensorFlow. Graph networks (PyTorch Geometric) write
their scalars like any model: the probe is a ``Data`` graph, ``(Data, nodes)`` or a list of
graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvcore.errors import InputError, describe
from cvcore.integrations.common import PREFIX, require, scalars
from cvcore.record.store import Record

INSTALL = "tensorboardX"


class ScalarWriter:
    """Writes records as TensorBoard scalars into one log directory.

    Args:
        logdir: the log directory (created when missing).
        prefix: the scalars' prefix.
    """

    def __init__(self, logdir: str | Path, prefix: str = PREFIX) -> None:
        if not isinstance(logdir, (str, Path)) or not str(logdir):
            raise InputError(f"expected tensorboard= a log directory path, got "
                             f"{describe(logdir)}")
        if Path(logdir).exists() and not Path(logdir).is_dir():
            raise InputError(f"expected tensorboard= a directory, got the file {logdir}")
        self._tbx = require("tensorboardX", INSTALL)
        self.logdir, self.prefix = Path(logdir), prefix
        self.writer: Any = None  # the event file is created at the first record

    def write(self, record: Record) -> None:
        """One record's values (and loss) at its step; flushed at once."""
        if self.writer is None:
            self.writer = self._tbx.SummaryWriter(logdir=str(self.logdir))
        for key, value in scalars(record, self.prefix).items():
            self.writer.add_scalar(key, value, global_step=record.step)
        if record.loss is not None:
            self.writer.add_scalar(f"{self.prefix}/loss", record.loss, global_step=record.step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
