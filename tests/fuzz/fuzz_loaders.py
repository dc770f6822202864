"""Coverage-guided fuzzing of cvcore's file loaders with atheris.

Every input is written to a file under each extension cvcore knows, and handed to the
checkpoint and data loaders; anything but a :class:`cvcore.CVCoreError` is a crash.

    python tests/fuzz/fuzz_loaders.py -runs=2000 -max_len=4096 CORPUS_DIR
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["cvcore"]):
    from cvcore import plugins
    from cvcore.checkpoints import load_checkpoint
    from cvcore.data_io import load_data, read_kernel
    from cvcore.errors import CVCoreError
    from cvcore.protocols import LoadOptions

    plugins.registry()  # imports every loader module, so they are instrumented too

SUFFIXES = (".pt", ".pt2", ".npz", ".npy", ".safetensors", ".msgpack", ".keras", ".h5", ".pkl")
WORKDIR = Path(tempfile.mkdtemp(prefix="cvcore-fuzz-"))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    suffix = SUFFIXES[fdp.ConsumeIntInRange(0, len(SUFFIXES) - 1)]
    path = WORKDIR / f"input{suffix}"
    path.write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    for attempt in (lambda: load_checkpoint(path, LoadOptions()),
                    lambda: load_data(str(path)),
                    lambda: read_kernel(path)):
        try:
            attempt()
        except CVCoreError:
            pass
    if any(WORKDIR.glob("pwned*")):
        raise AssertionError("a fuzzed file ran code")


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
