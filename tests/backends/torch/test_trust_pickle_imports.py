"""A pickled module names its classes' modules: cvcore imports one only if it defines the class.

Importing runs a module's top-level code and the file chose the module, so a module that is
not imported yet is read (``ast``, not run) first, and imported only when it defines the class
the pickle names. Each test writes a module whose import would create a marker file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from cvcore.backends.torch.loaders import load_torch_file

from cvcore.errors import UntrustedFileError

NET = ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
       "        super().__init__()\n        self.l = torch.nn.Linear(4, 2)\n"
       "    def forward(self, x):\n        return self.l(x)\n")


def _saved_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str) -> Path:
    """A ``torch.save`` of ``module.Net``, with ``module`` then forgotten by the interpreter."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / f"{module}.py").write_text(NET)
    monkeypatch.syspath_prepend(str(src))
    mod = __import__(module)
    path = tmp_path / "net.pt"
    torch.save(mod.Net(), path)
    monkeypatch.delitem(sys.modules, module)
    return path


def test_a_module_that_does_not_define_the_class_is_never_imported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved_net(tmp_path, monkeypatch, "cv_sidefx_a")
    marker = tmp_path / "imported"
    # The same module name now holds code with a side effect and no class Net.
    (tmp_path / "src" / "cv_sidefx_a.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(UntrustedFileError, match="cv_sidefx_a.Net") as info:
        load_torch_file(path, trust=False)
    assert "nothing was run" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    assert "cv_sidefx_a" not in sys.modules


def test_a_module_that_defines_the_class_is_imported_and_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved_net(tmp_path, monkeypatch, "cv_sidefx_b")
    model = load_torch_file(path, trust=False)
    assert type(model).__name__ == "Net" and type(model).__module__ == "cv_sidefx_b"
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model.l(x))


def test_a_package_level_that_is_not_source_is_not_imported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A submodule of a package whose ``__init__`` would run: the submodule must define the class."""
    path = _saved_net(tmp_path, monkeypatch, "cv_sidefx_c")
    marker = tmp_path / "imported"
    pkg = tmp_path / "src" / "cv_sidefx_c"
    (tmp_path / "src" / "cv_sidefx_c.py").unlink()
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(UntrustedFileError):
        load_torch_file(path, trust=False)
    assert not marker.exists()
