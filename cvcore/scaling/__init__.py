"""Scaling analysis of a sweep: ΔS over the grid, sign changes along parameter count with
a bootstrap over seeds, power-law and log fits, figures and a JSON summary."""

from __future__ import annotations

from cvcore.scaling.analysis import analyse, cell_metrics, linear_fit, points, sign_changes
from cvcore.scaling.load import load_sweep

__all__ = ["analyse", "cell_metrics", "linear_fit", "load_sweep", "points", "sign_changes"]
