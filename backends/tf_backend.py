"""The former home of the TensorFlow / Keras backend, kept so that
``from cvcore.backends.tf_backend import KerasBackend`` still works; the code lives in
:mod:`cvcore.backends.keras`."""

from __future__ import annotations

from cvcore.backends.keras.backend import KerasBackend, TFBackend

__all__ = ["KerasBackend", "TFBackend"]
