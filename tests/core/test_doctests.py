"""The examples in the backends' and adapters' docstrings run, under their installed names.

``--doctest-modules`` (pyproject.toml) reads ``cvcore/`` and ``tests/`` in place. The folders
``backends/`` and ``adapters/`` are installed as ``cvcore.backends`` and ``cvcore.adapters``
(setuptools ``package-dir``): collected by path, each module would be imported a second time
as ``backends.…``, beside the ``cvcore.backends.…`` the plugins load. So each module of the
two packages that holds an example is imported here by its installed name and its docstrings
run with pytest's own default flag (``ELLIPSIS``). A module whose framework is not installed
is skipped, not failed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
from pathlib import Path

import pytest

PACKAGES = ("cvcore.backends", "cvcore.adapters")


def modules_with_examples() -> list[str]:
    """Installed names of the modules of :data:`PACKAGES` whose source holds ``>>>``.

    Found from the files, so that collecting imports no framework.
    """
    names: list[str] = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, package
        for root in map(Path, spec.submodule_search_locations):
            for path in sorted(root.rglob("*.py")):
                if ">>>" not in path.read_text(encoding="utf-8"):
                    continue
                parts = path.relative_to(root).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                names.append(".".join((package, *parts)))
    return names


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_pass(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] == "cvcore":
            raise
        pytest.skip(f"{name} needs {error.name}, which is not installed")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    failed = attempted = 0
    for test in doctest.DocTestFinder().find(module, name):
        result = runner.run(test, out=report.append)
        failed, attempted = failed + result.failed, attempted + result.attempted
    assert attempted > 0, f"{name} holds '>>>' but no docstring example was found"
    assert failed == 0, "".join(report)
