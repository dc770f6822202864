"""CPU seconds per record of a Recorder with and without kernel dynamics, side by side.

Four Recorders on one model (64-64-64-10 tanh MLP, traced kernel, ``variables=["entropy",
"trace"]``, one probe set of N random inputs): plain, ``targets=`` (labels), ``dynamics=True``,
and both. They record in turn at each of 6 steps (the weights scaled by 1.01 between steps);
the median of the last 5 records is printed per Recorder, with the bytes it keeps between
records (``cost()["dynamics_bytes"]``). docs/recording.md, "Kernel dynamics"::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/record_dynamics.py 200
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/record_dynamics.py 1000
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

import cvcore


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 10))
    x = torch.randn(n, 64)
    y = np.arange(n) % 10
    configs: dict[str, dict[str, Any]] = {
        "plain": {}, "targets": {"targets": y}, "dynamics": {"dynamics": True},
        "targets+dynamics": {"targets": y, "dynamics": True}}
    spent: dict[str, list[float]] = {k: [] for k in configs}
    recs = {k: cvcore.Recorder(x, variables=["entropy", "trace"], **kw) for k, kw in configs.items()}
    for step in range(6):
        for k, rec in recs.items():  # interleaved, so a load change hits all four alike
            t0 = time.process_time()
            rec.record(step, model)
            spent[k].append(time.process_time() - t0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
    print(f"N = {n}, MLP 64-64-64-10 tanh, traced kernel, CPU seconds per record")
    for k, rec in recs.items():
        s = np.asarray(spent[k][1:])  # the first record warms up
        print(f"{k:18s} median {np.median(s) * 1e3:7.1f} ms CPU/record  (min {s.min() * 1e3:.1f})  "
              f"kept {rec.cost().get('dynamics_bytes', 0):.0f} bytes")


if __name__ == "__main__":
    main()
