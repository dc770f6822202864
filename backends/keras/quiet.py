"""TensorFlow's log noise, silenced while a measurement runs and restored afterwards.

Measuring a Keras convolution model makes TensorFlow log, on the Python ``tensorflow``
logger, one ``Conv2DBackpropFilter uses a while_loop. Fix that!`` warning per
convolution whose filter gradient pfor cannot vectorise, and a retracing warning when
many ``tf.function`` s are traced (each kernel builds fresh ones around that call's
weights, by design). Inside :func:`quiet_tensorflow` that logger only passes errors; its
level is put back when the block ends, however it ends. Nothing else (the user's own
loggers, the root logger, warnings) is touched, and TensorFlow is not imported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Raise the ``tensorflow`` logger to ``ERROR`` for this block, then restore its level.

    >>> import logging
    >>> logger = logging.getLogger("tensorflow")
    >>> before = logger.level
    >>> with quiet_tensorflow():
    ...     inside = logger.level
    >>> inside, logger.level == before
    (40, True)
    """
    logger = logging.getLogger("tensorflow")
    saved = logger.level
    logger.setLevel(max(logging.ERROR, saved))
    try:
        yield
    finally:
        logger.setLevel(saved)
