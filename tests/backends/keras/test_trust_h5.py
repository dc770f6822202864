"""HDF5 files whose data lives in other files are refused: h5py would read those files.

An external link, an external dataset or a virtual dataset makes ``load_weights`` /
``load_model`` read another local file as weights. Each test names a "secret" file the
crafted HDF5 points at and checks the refusal comes before anything is read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("keras")

from cvcore.backends.keras.loaders import (
    H5Loader,
    KerasArchiveLoader,
    check_h5_self_contained,
)

from cvcore.errors import UntrustedFileError
from cvcore.protocols import LoadOptions


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as fh:
        fh["kernel"] = np.arange(8, dtype="float32").reshape(4, 2)
    return secret


def _crafted(tmp_path: Path, how: str) -> Path:
    secret = _secret(tmp_path)
    path = tmp_path / f"{how}.h5"
    with h5py.File(path, "w") as fh:
        layer = fh.create_group("layers/dense/vars")
        if how == "external-link":
            layer["0"] = h5py.ExternalLink(str(secret), "/kernel")
        elif how == "external-dataset":
            raw = tmp_path / "raw.bin"
            raw.write_bytes(np.arange(8, dtype="float32").tobytes())
            layer.create_dataset("0", shape=(4, 2), dtype="float32", external=[(str(raw), 0, 32)])
        elif how == "virtual":
            vs = h5py.VirtualSource(str(secret), "kernel", shape=(4, 2))
            lay = h5py.VirtualLayout(shape=(4, 2), dtype="float32")
            lay[:] = vs
            layer.create_virtual_dataset("0", lay)
        else:
            layer["0"] = np.zeros((4, 2), dtype="float32")
            layer["1"] = h5py.SoftLink("/layers/dense/vars/0")
    return path


@pytest.mark.parametrize("how, words", [
    ("external-link", "an external link /layers/dense/vars/0 ->"),
    ("external-dataset", "stored in the external file"),
    ("virtual", "a virtual dataset /layers/dense/vars/0"),
])
def test_h5_reading_other_files_is_refused(tmp_path: Path, how: str, words: str) -> None:
    path = _crafted(tmp_path, how)
    with pytest.raises(UntrustedFileError, match=words) as info:
        H5Loader().load(path, LoadOptions(model_factory="nowhere:never"))
    assert "\n" not in str(info.value) and "pass --trust" in str(info.value)


def test_h5_with_only_its_own_data_passes(tmp_path: Path) -> None:
    check_h5_self_contained(_crafted(tmp_path, "soft-link"))


def test_keras_archive_whose_weights_link_elsewhere_is_refused(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
    good = tmp_path / "m.keras"
    model.save(good)
    KerasArchiveLoader().load(good, LoadOptions())  # a plain archive loads
    bad = tmp_path / "bad.keras"
    link = _crafted(tmp_path, "external-link").read_bytes()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, link if item.filename.endswith(".h5") else data)
    with pytest.raises(UntrustedFileError, match="an external link"):
        KerasArchiveLoader().load(bad, LoadOptions())
