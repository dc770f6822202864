"""The sweep's datasets: bundled (digits, iris), scikit-learn's (diabetes, wine), or .npz."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError
from cvcore.imports import require
from cvcore.sweep.config import DataSpec


@dataclass(frozen=True)
class Split:
    """Train and test arrays; ``classes`` is 0 for a regression target."""

    x_train: NDArray[np.float32]
    y_train: NDArray[Any]
    x_test: NDArray[np.float32]
    y_test: NDArray[Any]
    classes: int

    @property
    def in_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def out_features(self) -> int:
        return self.classes if self.classes else int(np.prod(self.y_train.shape[1:]) or 1)


def _raw(dataset: str) -> tuple[NDArray[Any], NDArray[Any], bool]:
    """Features, targets, and whether the targets are classes."""
    if dataset in ("digits", "iris"):
        from cvcore.data_io import load_bundled

        x, y = load_bundled(dataset)
        return x, y, True
    if dataset in ("diabetes", "wine"):
        datasets = require("sklearn.datasets", "data", name="scikit-learn")
        bunch = datasets.load_diabetes() if dataset == "diabetes" else datasets.load_wine()
        return (np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target),
                dataset == "wine")
    path = Path(dataset)
    if not path.is_file():
        raise InputError(f"[data] dataset: expected an existing .npz file, got {dataset!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files or "y" not in archive.files:
                raise InputError(f"[data] dataset: expected {path} to hold arrays x and y, got "
                                 f"{archive.files}")
            x, y = np.asarray(archive["x"]), np.asarray(archive["y"])
    except (OSError, ValueError) as exc:
        raise InputError(f"[data] dataset: expected a readable .npz file, got {exc}") from None
    if x.shape[0] != y.shape[0]:
        raise InputError(f"[data] dataset: expected x and y with the same number of samples, "
                         f"got {x.shape[0]} and {y.shape[0]}")
    return x, y, np.issubdtype(y.dtype, np.integer)


@functools.lru_cache(maxsize=4)
def load_split(spec: DataSpec) -> Split:
    """Shuffle once with ``spec.seed``, take ``train`` samples to train and the rest (or
    ``test`` of them) to test; standardize features (and a regression target) with the
    training statistics when asked (by default: scikit-learn's sets and .npz files)."""
    x, y, is_class = _raw(spec.dataset)
    n = x.shape[0]
    n_train = spec.train if spec.train is not None else round(0.7 * n)
    if n_train >= n:
        raise InputError(f"[data] train: expected fewer than the {n} samples of "
                         f"{spec.dataset!r} (the rest are the test set), got {n_train}")
    order = np.random.default_rng(spec.seed).permutation(n)
    tr, te = order[:n_train], order[n_train:]
    if spec.test is not None:
        if spec.test > te.size:
            raise InputError(f"[data] test: expected at most {te.size} samples (those left "
                             f"after {n_train} to train), got {spec.test}")
        te = te[:spec.test]
    x = x.reshape(n, -1).astype(np.float64) if x.ndim == 1 else x.astype(np.float64)
    standardize = spec.standardize if spec.standardize is not None else spec.dataset not in (
        "digits", "iris")
    x_tr, x_te = x[tr], x[te]
    if standardize:
        mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
        sd[sd == 0] = 1.0
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    if is_class:
        labels = np.unique(y)
        y_int = np.searchsorted(labels, y).astype(np.int64)
        return Split(x_tr.astype(np.float32), y_int[tr], x_te.astype(np.float32), y_int[te],
                     int(labels.size))
    yf = y.astype(np.float64).reshape(n, -1)
    y_tr, y_te = yf[tr], yf[te]
    if standardize:
        mu_y, sd_y = y_tr.mean(axis=0), y_tr.std(axis=0)
        sd_y[sd_y == 0] = 1.0
        y_tr, y_te = (y_tr - mu_y) / sd_y, (y_te - mu_y) / sd_y
    return Split(x_tr.astype(np.float32), y_tr.astype(np.float32), x_te.astype(np.float32),
                 y_te.astype(np.float32), 0)
