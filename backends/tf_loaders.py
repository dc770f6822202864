"""The former home of the TensorFlow / Keras checkpoint loaders, kept for its import
path; the code lives in :mod:`cvcore.backends.keras.loaders`."""

from __future__ import annotations

from cvcore.backends.keras.loaders import LOADERS, H5Loader, KerasArchiveLoader, SavedModelLoader

__all__ = ["LOADERS", "H5Loader", "KerasArchiveLoader", "SavedModelLoader"]
