"""What a sweep will cost, checked before it starts.

The cost model extends the ordering's (width² × depth × epochs, ``run.py``) to seconds:
a cell's forward pass costs about its multiply-adds per sample ``W`` (its parameter
count for a dense net; each conv layer's weights once per pixel), so that

- training: ``6 W`` flops per sample per epoch (forward and backward), plus a fixed
  cost per optimizer step;
- each record: ``2 W`` per sample of the train and test sets (the losses), ``4 P O``
  per probe sample (the Jacobian, ``O`` outputs, ``P`` parameters) and ``4 N³`` per probe
  set (the eigenvalues);
- one thread does :data:`FLOPS_PER_SECOND`.

The constants are fitted to the measurement in ``docs/reproduction.md``: the widest,
deepest digits cell (5.08 M parameters) trains its 100 epochs in 60 CPU-s and records its
17 records in 13; the whole 108-cell grid costs about 820 CPU-s. The estimate is rough (a
factor of two either way), and it is only there to stop a sweep that would run for hours
or days by mistake: above :data:`MAX_CELLS` cells or :data:`MAX_WALL_SECONDS` of
estimated wall time a sweep needs ``--allow-large``; above :data:`HARD_MAX_CELLS` cells
or :data:`MAX_PARAMS` parameters in one cell it is refused whatever the flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cvcore.errors import InputError, ResourceError
from cvcore.sweep import family_cost
from cvcore.sweep.config import Cell, ConfigError, SweepConfig
from cvcore.sweep.data import load_split
from cvcore.sweep.families import FAMILY_SPECS
from cvcore.sweep.family_cost import Shape

#: One thread's sustained rate on the sweep's small dense layers (fitted, see above).
FLOPS_PER_SECOND = 5.0e10
#: Fixed costs: per cell (start, data, store), per optimizer step, per record.
CELL_SECONDS, STEP_SECONDS, RECORD_SECONDS = 0.5, 3e-4, 0.02
#: Without ``--allow-large``: at most this many cells and this much estimated wall time.
MAX_CELLS = 10_000
MAX_WALL_SECONDS = 3600.0
#: Never, flag or not: more cells than this, or a cell with more parameters than this.
HARD_MAX_CELLS = 100_000
MAX_PARAMS = 200_000_000


def human(seconds: float) -> str:
    """``42s``, ``7.1min`` or ``649.0h``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def check_count(config: SweepConfig, *, allow_large: bool) -> int:
    """The grid's cell count (a product, nothing expanded), or a one-line refusal."""
    count = config.cell_count()
    if count > HARD_MAX_CELLS:
        raise ConfigError(f"[grid]: expected at most {HARD_MAX_CELLS:,} cells (each has its "
                          f"own files), got {count:,}")
    if count > MAX_CELLS and not allow_large:
        raise ConfigError(f"[grid]: expected at most {MAX_CELLS:,} cells without "
                          f"--allow-large, got {count:,}")
    return count


def _module_family(config: SweepConfig) -> bool:
    spec = FAMILY_SPECS.get(config.family)
    return spec is not None and spec.module is not None


def check_data(config: SweepConfig) -> Shape:
    """Load the data once and check the sizes that depend on it (probe sizes, subsets,
    a class loss on a regression target) before any cell starts."""
    if _module_family(config):
        first = config.resolve(config.cells()[0])[0] if config.cell_count() else {}
        shape = family_cost.shape(config, {**config.model, **first})
        if config.family == "rl":
            return shape
    else:
        split = load_split(config.data)
        shape = Shape(len(split.x_train), len(split.x_test), split.in_features,
                      split.out_features, split.classes)
    n_train, n_test = shape.n_train, shape.n_test
    probe = config.probe
    if probe.train > n_train:
        raise InputError(f"[probe] train: expected at most the {n_train} training samples, "
                         f"got {probe.train}")
    if probe.test > n_test:
        raise InputError(f"[probe] test: expected at most the {n_test} test samples, "
                         f"got {probe.test}")
    if probe.subsets is not None:
        smallest = min(n for n in (probe.train, probe.test) if n)
        if probe.subsets[1] > smallest:
            raise InputError(f"[probe] subsets: expected subsets of at most {smallest} "
                             f"samples (the smallest probe set), got {probe.subsets[1]}")
    losses = config.grid.get("loss", [config.train.loss])
    if "cross_entropy" in losses and not shape.classes:
        raise InputError(f"[train] loss: expected mse for the regression target of "
                         f"{config.data.dataset!r}, got cross_entropy")
    return shape


def _size(config: SweepConfig, params: dict[str, Any], split: Shape) -> tuple[float, float]:
    """(parameters, multiply-adds per sample of one forward pass) of a cell's model."""
    if _module_family(config):
        return family_cost.size(config, params)
    width, depth = params.get("width", 100), params.get("depth", 1)
    width = width if isinstance(width, int) and not isinstance(width, bool) else 100
    depth = depth if isinstance(depth, int) and not isinstance(depth, bool) else 1
    n_in, n_out = split.in_features, split.out_features
    if config.family == "conv":
        shape = params.get("image_shape") or [1, math.isqrt(n_in), math.isqrt(n_in)]
        channels, pixels = shape[0], max(1, n_in // max(1, shape[0]))
        k2 = params.get("kernel_size", 3) ** 2
        conv = (channels * k2 * width + width) + (depth - 1) * (width * k2 * width + width)
        head = width * n_out + n_out
        return float(conv + head), float(conv * pixels + head)
    dense = (n_in * width + width) + (depth - 1) * (width * width + width) \
        + width * n_out + n_out
    return float(dense), float(dense)


def cell_seconds(config: SweepConfig, cell: Cell, split: Shape) -> float:
    """The estimated CPU seconds of one cell on one thread (see the module)."""
    params, recipe, _ = config.resolve(cell)
    records = len(config.record.schedule(recipe.epochs))
    if config.family == "rl":
        return CELL_SECONDS + family_cost.rl_seconds(config, params, recipe, records,
                                                     FLOPS_PER_SECOND)
    n_params, work = _size(config, params, split)
    n_train, n_test = split.n_train, split.n_test
    step_seconds = family_cost.STEP_SECONDS.get(config.family, STEP_SECONDS)
    steps = recipe.epochs * math.ceil(n_train / recipe.batch_size)
    probes = [n for n in (config.probe.train, config.probe.test) if n]
    # the Jacobian's cost per probe sample and output: the parameter count times a
    # family's measured factor (1 for dense and conv)
    jacobian = n_params * family_cost.KERNEL_FACTOR.get(config.family, 1.0)
    flops = 6 * work * n_train * recipe.epochs + records * (
        2 * work * (n_train + n_test) + 4 * jacobian * sum(probes) * split.out_features
        + sum(4 * n ** 3 for n in probes))
    return (family_cost.CELL_SECONDS.get(config.family, CELL_SECONDS)
            + step_seconds * steps + RECORD_SECONDS * records
            + flops / FLOPS_PER_SECOND)


def check_cost(config: SweepConfig, cells: Sequence[Cell], split: Shape, *, workers: int,
               allow_large: bool) -> float:
    """The estimated wall seconds of ``cells`` on ``workers``, or a one-line refusal
    (a cell too large for memory; a sweep too long without ``allow_large``)."""
    total = 0.0
    for cell in cells:
        model, _, _ = config.resolve(cell)
        n_params, _ = _size(config, model, split)
        if n_params > MAX_PARAMS:
            raise ResourceError(f"cell {cell.id}: expected at most {MAX_PARAMS:,} parameters "
                                f"per cell, got about {n_params:,.0f}")
        total += cell_seconds(config, cell, split)
    wall = total / max(1, workers)
    if wall > MAX_WALL_SECONDS and not allow_large:
        raise ConfigError(f"expected a sweep estimated at most {human(MAX_WALL_SECONDS)} "
                          f"without --allow-large, got {len(cells):,} cells estimated at "
                          f"~{human(wall)} on {workers} worker{'s' if workers != 1 else ''} "
                          f"(~{human(total)} of CPU time)")
    return wall
