"""The sweep's config file (TOML): read, checked key by key, and expanded into cells.

Every mistake is one line naming the key and what it accepts. The schema, with a
complete example, is in ``docs/sweep.md``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from cvcore.errors import InputError
from cvcore.sweep.families import ACTIVATIONS, FAMILIES, FAMILY_SPECS, TABULAR
from cvcore.sweep.ids import cell_id, check_grid_ids

DATASETS = TABULAR + ("text", "karate", "graphs", "cartpole")
OPTIMIZERS = ("adam", "adamw", "sgd", "sgd_momentum")
SCHEDULES = ("constant", "cosine", "warmup")
LOSSES = ("cross_entropy", "mse")
INITS = ("default", "flax", "xavier", "kaiming", "orthogonal")
KERNELS = ("traced", "full")
DTYPES = ("float32", "float64")
#: Keys of [train]; a grid axis with one of these names varies the recipe.
TRAIN_KEYS = ("optimizer", "lr", "epochs", "batch_size", "loss", "init", "momentum",
              "weight_decay", "schedule", "warmup")
SECTIONS = ("name", "model", "grid", "data", "train", "probe", "record")
#: Largest epochs, width and depth a config may ask for: far beyond any study the sweep is
#: for, small enough that the recording schedule and a model's tensors fit in memory.
MAX_EPOCHS = 100_000
MAX_WIDTH = 100_000
MAX_DEPTH = 1_000

__all__ = ["ACTIVATIONS", "FAMILIES", "Cell", "ConfigError", "SweepConfig", "cell_id", "load_config", "parse_config"]


class ConfigError(InputError):
    """The sweep's config file has a wrong key or value."""


@dataclass(frozen=True)
class TrainSpec:
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 100
    batch_size: int = 100
    loss: str = "cross_entropy"
    init: str = "default"
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.1


@dataclass(frozen=True)
class DataSpec:
    dataset: str = "digits"
    train: int | None = None
    test: int | None = None
    seed: int = 0
    standardize: bool | None = None


@dataclass(frozen=True)
class ProbeSetsSpec:
    train: int = 200
    test: int = 200
    subsets: tuple[int, int] | None = None
    variables: tuple[str, ...] = ("entropy", "trace")
    kernel: str = "traced"
    dtype: str = "float32"
    #: record the kernel's alignment with the probe's labels (where the family has them)
    #: and its motion between records (``cvcore.Recorder(targets=, dynamics=True)``)
    dynamics: bool = False
    top_k: int = 10


@dataclass(frozen=True)
class RecordSpec:
    every: int | None = 10
    steps: tuple[int, ...] | None = None

    def schedule(self, epochs: int) -> list[int]:
        """The epochs recorded (before that epoch's updates; ``epochs`` is the end)."""
        if self.steps is not None:
            return sorted({s for s in self.steps if s <= epochs} | {0, epochs})
        every = self.every or 1
        return sorted(set(range(0, epochs + 1, every)) | {epochs})


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its id (a file name) and the grid's values there."""

    index: int
    id: str
    params: dict[str, Any]


@dataclass(frozen=True)
class SweepConfig:
    name: str
    family: str
    model: dict[str, Any]
    grid: dict[str, list[Any]]
    data: DataSpec
    train: TrainSpec
    probe: ProbeSetsSpec
    record: RecordSpec
    text: str = field(default="", repr=False, compare=False)

    def cell_count(self) -> int:
        """How many cells the grid has, without expanding it."""
        return math.prod(len(values) for values in self.grid.values())

    def cells(self) -> list[Cell]:
        """Every combination of the grid's values, in the order of the file's axes
        (check :meth:`cell_count` first: a large grid is a long list)."""
        keys = list(self.grid)
        out = []
        for i, values in enumerate(itertools.product(*(self.grid[k] for k in keys))):
            params = dict(zip(keys, values, strict=True))
            out.append(Cell(i, cell_id(params), params))
        return out

    def resolve(self, cell: Cell) -> tuple[dict[str, Any], TrainSpec, int]:
        """The factory's parameters, the training recipe and the seed of one cell."""
        model = dict(self.model)
        train = {f: getattr(self.train, f) for f in TRAIN_KEYS}
        seed = 0
        for key, value in cell.params.items():
            if key == "seed":
                seed = int(value)
            elif key in TRAIN_KEYS:
                train[key] = value
            else:
                model[key] = value
        return model, TrainSpec(**train), seed


# -- reading -------------------------------------------------------------------------

def load_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep config file.

    Raises:
        ConfigError: the file is missing, not TOML, or has a wrong key or value.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: expected a sweep config file (.toml), got no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: expected a UTF-8 TOML file, got a byte {exc.object[exc.start]:#04x} "
                          f"that is not UTF-8 at offset {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: expected a readable sweep config file, got "
                          f"{exc.strerror or exc}") from None
    return parse_config(text, where=str(p), default_name=p.stem)


def parse_config(text: str, *, where: str = "config", default_name: str = "sweep") -> SweepConfig:
    """Check a config given as TOML text (see :func:`load_config`)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: expected TOML, got a syntax error: {exc}") from None
    c = _ConfigChecker(where)
    c.keys("", raw, SECTIONS)
    name = raw.get("name", default_name)
    c.type("name", name, str)
    _check_name(c, name)
    model_raw = c.table("model", raw.get("model"), required=True)
    family = model_raw.get("family")
    if family is None:
        raise ConfigError(f"{where}: [model] family: expected one of {', '.join(FAMILIES)} or a "
                          f"factory 'package.module:function', got nothing")
    c.type("model.family", family, str)
    if family not in FAMILIES and not re.fullmatch(r"[\w.]+:[\w.]+", family):
        raise ConfigError(f"{where}: [model] family: expected one of {', '.join(FAMILIES)} or a "
                          f"factory 'package.module:function', got {family!r}")
    model = {k: v for k, v in model_raw.items() if k != "family"}
    grid_raw = c.table("grid", raw.get("grid"), required=False)
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [grid] {key}: expected a non-empty list of values, "
                              f"got {values!r}")
        grid[key] = list(values)
    clash = check_grid_ids(grid)
    if clash is not None:
        raise ConfigError(f"{where}: {clash}")
    spec = FAMILY_SPECS.get(family)
    train = _train(c, raw.get("train"), "cross_entropy" if spec is None else spec.loss)
    if family in FAMILIES:
        _check_family(c, family, model, grid)
    for key, values in grid.items():
        if key in TRAIN_KEYS:
            for v in values:
                _train(c, {**_as_dict(train), key: v})
        if key == "seed":
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ConfigError(f"{where}: [grid] seed: expected non-negative integers, "
                                      f"got {v!r}")
    data = _data(c, raw.get("data"), family)
    probe = _probe(c, raw.get("probe"))
    record = _record(c, raw.get("record"))
    return SweepConfig(name=name, family=family, model=model, grid=grid, data=data,
                       train=train, probe=probe, record=record, text=text)


def _check_family(c: _ConfigChecker, family: str, model: dict[str, Any],
                  grid: dict[str, list[Any]]) -> None:
    """A built-in family's parameters: known names, sizes positive integers, choices."""
    spec = FAMILY_SPECS[family]
    allowed = spec.params
    where = c.where
    for key in model:
        if key not in allowed:
            raise ConfigError(f"{where}: [model] {key}: expected a parameter of the "
                              f"{family} family among {', '.join(allowed)}, got {key!r}")
    for key in grid:
        if key not in allowed and key not in TRAIN_KEYS and key != "seed":
            raise ConfigError(f"{where}: [grid] {key}: expected seed, a [train] key "
                              f"({', '.join(TRAIN_KEYS)}) or a {family} parameter "
                              f"({', '.join(allowed)}), got {key!r}")
    for key in ("width", "depth"):
        if key not in model and key not in grid:
            raise ConfigError(f"{where}: [model] {key}: expected a positive integer "
                              f"(in [model] or as a [grid] axis), got nothing")
    for key, most in spec.ints.items():
        for v in ([model[key]] if key in model else []) + grid.get(key, []):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{where}: {key}: expected positive integers, got {v!r}")
            if v > most:
                raise ConfigError(f"{where}: {key}: expected at most {most:,}, got {v:,}")
    for key, options in spec.choices.items():
        for v in ([model[key]] if key in model else []) + grid.get(key, []):
            if v not in options or isinstance(v, bool) != isinstance(options[0], bool):
                raise ConfigError(f"{where}: {key}: expected one of "
                                  f"{', '.join(map(str, options))}, got {v!r}")


def _check_name(c: _ConfigChecker, name: str) -> None:
    """A sweep's name is one plain folder name: ``runs/<name>`` stays under ``runs``."""
    if (not name.strip() or name in (".", "..") or any(ch in name for ch in "/\\\0")
            or Path(name).is_absolute() or name != name.strip()):
        raise c.fail("name", "a plain folder name (no path separators, not . or .., no "
                     "leading or trailing spaces; the sweep goes to runs/<name>)", name)


def _as_dict(spec: TrainSpec) -> dict[str, Any]:
    return {f: getattr(spec, f) for f in TRAIN_KEYS}


class _ConfigChecker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: expected {expected}, got {got!r}")

    def keys(self, section: str, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                label = f"[{section}] {key}" if section else key
                where = f"keys of [{section}]" if section else "top-level keys"
                raise ConfigError(f"{self.where}: {label}: expected one of the {where} "
                                  f"({', '.join(allowed)}), got {key!r}")

    def table(self, section: str, value: Any, *, required: bool) -> dict[str, Any]:
        if value is None:
            if required:
                raise ConfigError(f"{self.where}: [{section}]: expected a table, got nothing")
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"[{section}]", "a table", value)
        return value

    def type(self, key: str, value: Any, kind: type | tuple[type, ...]) -> None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, " or ".join(k.__name__ for k in kinds), value)
        if not isinstance(value, kinds):
            raise self.fail(key, " or ".join(k.__name__ for k in kinds), value)

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise self.fail(key, "one of " + ", ".join(choices), value)

    def positive_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, "a positive integer", value)
        return value

    def number(self, key: str, value: Any, *, positive: bool = False) -> float:
        """A finite number, > 0 with ``positive`` and >= 0 otherwise (NaN and inf refused)."""
        expected = "a positive number" if positive else "a number >= 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                value <= 0 if positive else value < 0):
            raise self.fail(key, expected, value)
        if not math.isfinite(value):
            raise self.fail(key, f"{expected}, finite", value)
        return float(value)


def _train(c: _ConfigChecker, value: Any, loss: str = "cross_entropy") -> TrainSpec:
    t = c.table("train", value, required=False)
    c.keys("train", t, TRAIN_KEYS)
    d = TrainSpec(loss=loss)
    spec = TrainSpec(
        optimizer=t.get("optimizer", d.optimizer), lr=t.get("lr", d.lr),
        epochs=t.get("epochs", d.epochs), batch_size=t.get("batch_size", d.batch_size),
        loss=t.get("loss", d.loss), init=t.get("init", d.init),
        momentum=t.get("momentum", d.momentum), weight_decay=t.get("weight_decay", d.weight_decay),
        schedule=t.get("schedule", d.schedule), warmup=t.get("warmup", d.warmup))
    c.choice("[train] optimizer", spec.optimizer, OPTIMIZERS)
    c.choice("[train] schedule", spec.schedule, SCHEDULES)
    if c.number("[train] warmup", spec.warmup) > 1:
        raise c.fail("[train] warmup", "a fraction of the training steps in [0, 1]",
                     spec.warmup)
    c.choice("[train] loss", spec.loss, LOSSES)
    c.choice("[train] init", spec.init, INITS)
    c.number("[train] lr", spec.lr, positive=True)
    c.number("[train] momentum", spec.momentum)
    c.number("[train] weight_decay", spec.weight_decay)
    if isinstance(spec.epochs, bool) or not isinstance(spec.epochs, int) or spec.epochs < 0:
        raise c.fail("[train] epochs", "an integer >= 0", spec.epochs)
    if spec.epochs > MAX_EPOCHS:
        raise c.fail("[train] epochs", f"at most {MAX_EPOCHS:,}", spec.epochs)
    c.positive_int("[train] batch_size", spec.batch_size)
    return spec


def _data(c: _ConfigChecker, value: Any, family: str = "dense") -> DataSpec:
    t = c.table("data", value, required=False)
    c.keys("data", t, ("dataset", "train", "test", "seed", "standardize"))
    d = DataSpec()
    spec = FAMILY_SPECS.get(family)
    dataset = t.get("dataset", d.dataset if spec is None else spec.default_dataset)
    c.type("[data] dataset", dataset, str)
    if spec is not None and spec.module is not None:
        if dataset not in spec.datasets:
            raise c.fail("[data] dataset", f"one of {', '.join(spec.datasets)} for the "
                         f"{family} family", dataset)
    elif dataset not in TABULAR and not dataset.endswith(".npz"):
        raise c.fail("[data] dataset", f"one of {', '.join(TABULAR)} or a path to an .npz "
                     "file with arrays x and y", dataset)
    train, test = t.get("train"), t.get("test")
    if train is not None:
        c.positive_int("[data] train", train)
    if test is not None:
        c.positive_int("[data] test", test)
    seed = t.get("seed", d.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise c.fail("[data] seed", "an integer >= 0", seed)
    standardize = t.get("standardize")
    if standardize is not None:
        c.type("[data] standardize", standardize, bool)
    return DataSpec(dataset=dataset, train=train, test=test, seed=seed, standardize=standardize)


def _probe(c: _ConfigChecker, value: Any) -> ProbeSetsSpec:
    from cvcore.api import parse_variables

    t = c.table("probe", value, required=False)
    c.keys("probe", t, ("train", "test", "subsets", "variables", "kernel", "dtype",
                        "dynamics", "top_k"))
    d = ProbeSetsSpec()
    train, test = t.get("train", d.train), t.get("test", d.test)
    if isinstance(train, bool) or not isinstance(train, int) or train < 0:
        raise c.fail("[probe] train", "an integer >= 0 (0: no train probe)", train)
    if isinstance(test, bool) or not isinstance(test, int) or test < 0:
        raise c.fail("[probe] test", "an integer >= 0 (0: no test probe)", test)
    if train == 0 and test == 0:
        raise c.fail("[probe] train", "at least one probe set of size > 0", 0)
    subsets = t.get("subsets")
    if subsets is not None:
        if not (isinstance(subsets, list) and len(subsets) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for v in subsets)):
            raise c.fail("[probe] subsets", "[K, n], two positive integers", subsets)
        subsets = (subsets[0], subsets[1])
    variables = t.get("variables", list(d.variables))
    if not isinstance(variables, list) or not all(isinstance(v, str) for v in variables):
        raise c.fail("[probe] variables", "a list of variable names", variables)
    try:
        parsed = parse_variables(variables)
    except InputError as exc:
        raise ConfigError(f"{c.where}: [probe] variables: {exc}") from None
    assert parsed is not None
    if "entropy" not in parsed:
        raise c.fail("[probe] variables", "a list that includes 'entropy' (the scaling "
                     "analysis reads it)", variables)
    kernel = t.get("kernel", d.kernel)
    c.choice("[probe] kernel", kernel, KERNELS)
    dtype = t.get("dtype", d.dtype)
    c.choice("[probe] dtype", dtype, DTYPES)
    dynamics = t.get("dynamics", d.dynamics)
    c.type("[probe] dynamics", dynamics, bool)
    top_k = t.get("top_k", d.top_k)
    c.positive_int("[probe] top_k", top_k)
    return ProbeSetsSpec(train=train, test=test, subsets=subsets, variables=parsed, kernel=kernel,
                         dtype=dtype, dynamics=dynamics, top_k=top_k)


def _record(c: _ConfigChecker, value: Any) -> RecordSpec:
    t = c.table("record", value, required=False)
    c.keys("record", t, ("every", "steps"))
    if "every" in t and "steps" in t:
        raise c.fail("[record] steps", "either every or steps, not both", t["steps"])
    if "steps" in t:
        steps = t["steps"]
        if not isinstance(steps, list) or not steps or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
            raise c.fail("[record] steps", "a non-empty list of epochs (integers >= 0)", steps)
        return RecordSpec(every=None, steps=tuple(steps))
    every = t.get("every", 10)
    c.positive_int("[record] every", every)
    return RecordSpec(every=every)
