"""ΔS against parameter count at depth 3 for three recipes: the paper's (cross-entropy,
Flax-style init), MSE instead of cross-entropy, PyTorch's default init instead of Flax's.

    python examples/sweeps/sensitivity.py runs/digits runs/digits-mse \
        runs/digits-default-init docs/figures/sensitivity_digits_depth3.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cvcore.scaling import load_sweep, points
from cvcore.scaling.figures import pyplot

LABELS = ("cross-entropy, Flax init", "MSE, Flax init", "cross-entropy, default init")


def main(paper: str, mse: str, default: str, out: str, depth: int = 3) -> None:
    plt = pyplot()
    sweeps = [load_sweep(d) for d in (paper, mse, default)]
    activations = sweeps[0].grid["activation"]
    fig, axs = plt.subplots(2, len(activations), figsize=(4.5 * len(activations), 6.2),
                            squeeze=False, sharex=True)
    for row, probe in enumerate(("train", "test")):
        for col, act in enumerate(activations):
            ax = axs[row][col]
            for label, sweep, style in zip(LABELS, sweeps, ("-o", "--s", ":^"), strict=True):
                pts = sorted((p for p in points(sweep.cells, probe)
                              if p.params.get("activation") == act
                              and p.params.get("depth", depth) == depth),
                             key=lambda p: p.n_params)
                n = np.asarray([p.n_params for p in pts])
                ax.errorbar(n, [p.mean("delta_S") for p in pts],
                            yerr=[p.std("delta_S") for p in pts], fmt=style, ms=3, capsize=2,
                            label=label)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xscale("log")
            ax.set_title(f"{act}, depth {depth}, {probe} probe", fontsize=9)
            if col == 0:
                ax.set_ylabel("ΔS = S(end) − S(start)")
            if row == 1:
                ax.set_xlabel("trainable parameters")
    axs[0][0].legend(fontsize=7)
    fig.suptitle("digits: sensitivity of ΔS to the loss and the initialisation "
                 "(mean ± std over seeds)", fontsize=10)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")


if __name__ == "__main__":
    main(*sys.argv[1:5])
