"""A user's model factory for the sweep tests (``tests.sweep_factories:make``)."""

from __future__ import annotations

import os
import signal

from torch import nn


def make(width: int, in_features: int, out_features: int, **_: object) -> nn.Module:
    if width == 13:
        raise RuntimeError("width 13 is not supported by this factory")
    if width == 14:  # a worker process that dies (as the kernel's OOM killer would kill it)
        os.kill(os.getpid(), signal.SIGKILL)
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features))
