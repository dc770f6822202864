"""Sweeps: one config file, a grid of cells, each trained and recorded into its own store.

``load_config`` reads and checks the TOML file (schema in ``docs/sweep.md``);
``run_sweep`` runs the cells not yet done on local worker processes or a Dask cluster.
"""

from __future__ import annotations

from cvcore.sweep.config import Cell, ConfigError, SweepConfig, load_config, parse_config
from cvcore.sweep.run import load_sweep_config, run_sweep

__all__ = ["Cell", "ConfigError", "SweepConfig", "load_config", "load_sweep_config",
           "parse_config", "run_sweep"]
