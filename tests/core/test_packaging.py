"""The wheel maps backends/, adapters/ and cli/ into the cvcore package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("cvcore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"cvcore"}
    for expected in ("cvcore/backends/torch/backend.py", "cvcore/backends/jax/backend.py",
                     "cvcore/backends/keras/backend.py", "cvcore/adapters/plugin.py",
                     "cvcore/cli/app.py", "cvcore/data/digits.npz", "cvcore/py.typed",
                     "cvcore/integrations/lightning.py"):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "cv = cvcore.cli.app:main" in text
    assert "torch = cvcore.backends.torch" in text


def test_version_comes_from_the_package_metadata() -> None:
    import tomllib

    import cvcore

    with open(ROOT / "pyproject.toml", "rb") as fh:
        declared = tomllib.load(fh)["project"]["version"]
    assert cvcore.__version__ == declared
