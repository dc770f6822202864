"""One request, one path: the option list written once, the plan resolved once (and
cached by the Recorder), and framework chores asked of backends, never done in the core."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cvcore
from cvcore import capabilities, plugins
from cvcore.data_io import take
from cvcore.errors import InputError
from cvcore.hookspecs import hookimpl
from cvcore.protocols import KernelRequest, KernelResult
from cvcore.request import MEASURE_ONLY, NTK_ONLY, Compute, Options, option_names
from cvcore.validate import measure_request

ROOT = Path(__file__).resolve().parents[2]


def _keywords(fn: Any) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def test_the_option_list_is_written_once() -> None:
    """ntk's and measure's keywords are Options' fields (measure adds what to compute);
    no ``**options`` hides a signature."""
    assert sorted(_keywords(cvcore.ntk)) == sorted((*option_names(), *NTK_ONLY))
    assert sorted(_keywords(cvcore.measure)) == sorted((*option_names(), *MEASURE_ONLY))
    for fn in (cvcore.ntk, cvcore.measure):
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD
                       for p in inspect.signature(fn).parameters.values())
    defaults = {f.name: f.default for f in fields(Options)}
    for name, param in inspect.signature(cvcore.measure).parameters.items():
        if name in defaults:
            assert param.default == defaults[name], name


def test_what_to_compute_is_decided_in_one_place() -> None:
    assert measure_request().compute is Compute.KERNEL
    assert measure_request(variables="trace").compute is Compute.DIAGONAL
    assert measure_request(variables="trace,entropy").compute is Compute.KERNEL
    assert measure_request(per_layer=True).compute is Compute.LAYERS
    with pytest.raises(InputError, match="per_layer without variables"):
        measure_request(per_layer=True, variables="trace")
    assert not measure_request(variables="entropy").covariance


#: The parts of cvcore that must never import a framework: the sweep (which trains torch
#: models) and the training-loop integrations (one per library) are left out on purpose.
CORE = [p for p in sorted((ROOT / "cvcore").rglob("*.py"))
        if not {"sweep", "integrations"} & set(p.relative_to(ROOT / "cvcore").parts)]
FRAMEWORK = re.compile(
    r"^\s*(import|from)\s+(torch|jax|jaxlib|tensorflow|keras|flax|equinox)\b"
    r"|sys\.modules(\.get\(|\[)\s*[\"'](torch|jax|jax\.numpy|tensorflow|keras)[\"']",
    re.MULTILINE)


def test_no_core_module_touches_a_framework() -> None:
    """Seeding, guarding, counting, taking rows: backend capabilities (cvcore.capabilities),
    so no core module imports or looks up a framework itself."""
    assert len(CORE) > 20
    found = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in CORE
             for m in FRAMEWORK.finditer(p.read_text(encoding="utf-8"))]
    assert found == []


class Counted:
    """A model only :class:`ChoreBackend` accepts."""


class ChoreBackend:
    """A third-party backend that takes part in seeding, guarding, counting and taking."""

    name = "chores"
    extra = "chores"
    modules = ("numpy",)

    def __init__(self) -> None:
        self.log: list[Any] = []

    def available(self) -> bool:
        return True

    def accepts(self, model: object) -> bool:
        return isinstance(model, Counted)

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        x = np.asarray(inputs, dtype=np.float64)
        return KernelResult(kernel=x @ x.T, n_samples=x.shape[0], n_outputs=1, n_params=7)

    def seed(self, seed: int) -> None:
        self.log.append(("seed", seed))

    @contextlib.contextmanager
    def guard(self, model: Any) -> Iterator[None]:
        self.log.append("enter")
        yield
        self.log.append("exit")

    def count_parameters(self, model: Any) -> int | None:
        return 7

    def take(self, inputs: Any, index: Any) -> Any:
        self.log.append(("take", tuple(index.tolist())))
        return inputs.rows(index)


class Rows:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def rows(self, index: Any) -> np.ndarray:
        return self.data[index]


@pytest.fixture
def chores() -> Iterator[ChoreBackend]:
    backend = ChoreBackend()

    class Plugin:
        @hookimpl
        def cvcore_register_backends(self, register: Any) -> None:
            register(backend)

    plugin = Plugin()
    plugins.register(plugin, name="chores-plugin")
    yield backend
    plugins.unregister(plugin)


def test_a_third_party_backend_takes_part_in_the_chores(chores: ChoreBackend) -> None:
    capabilities.seed_frameworks(3)
    with capabilities.untouched(Counted()):
        chores.log.append("body")
    assert ("seed", 3) in chores.log and chores.log[-3:] == ["enter", "body", "exit"]
    assert capabilities.count_parameters(Counted(), chores) == 7
    rows = take({"a": Rows(np.arange(6.0).reshape(3, 2))}, np.array([0, 2]), chores)
    np.testing.assert_array_equal(rows["a"], [[0.0, 1.0], [4.0, 5.0]])


def test_the_recorder_resolves_its_plan_once(chores: ChoreBackend,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[Any] = []
    real = plugins.select_backend
    monkeypatch.setattr(plugins, "select_backend",
                        lambda model: chosen.append(model) or real(model))
    x = np.random.default_rng(0).normal(size=(8, 3))
    with cvcore.Recorder({"train": x, "test": x[:4]}, subsets=(2, 3)) as rec:
        for step in range(3):
            rec.record(step, Counted())
    assert len(chosen) == 2  # one plan per probe set, not one per set and step
    assert len(rec.records()) == 3


def test_cv_measure_asks_each_data_loader_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader that claims ``--data`` is found once and used to load it."""
    torch = pytest.importorskip("torch")
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    asked: dict[str, int] = {}

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def claims(self, spec: str) -> bool:
            asked[self.inner.name] = asked.get(self.inner.name, 0) + 1
            return bool(self.inner.claims(spec))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    loaders = plugins.registry().data_loaders
    for name, loader in list(loaders.items()):
        monkeypatch.setitem(loaders, name, Counting(loader))
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 3)), tmp_path / "m.pt")
    done = CliRunner().invoke(make_app(), ["measure", str(tmp_path / "m.pt"), "--data", "digits",
                                           "--samples", "8", "--json"])
    assert done.exit_code == 0, done.output
    assert asked and max(asked.values()) == 1, asked
