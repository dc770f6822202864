"""Time of ``estimate(method="exact")`` against ``method="stochastic"`` by kernel size.

Run: ``python benchmarks/crossover.py full:100 full:200 full:300 traced:500 traced:1000``
(``KERNEL:N`` pairs). The model is the digits MLP (64-16-10, 1210 parameters, seed 0) on
the first N bundled digits inputs (beyond the 1797 digits, noisy copies of them:
``x + N(0, 0.1²)`` per pixel, pixels being scaled to 0..1), float32, at ``estimate``'s default ``probes``,
``steps`` and ``top_k``; one line per pair with both methods' process CPU time (all
threads: what other load on the machine distorts least) and wall time, both entropies,
and ``os.getloadavg()`` before the pair. ``method="auto"`` should choose exact where its
time is the smaller one (see docs/estimators.md).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def _timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    import torch

    from cvcore.data_io import load_bundled
    from cvcore.estimate import DEFAULT_PROBES, DEFAULT_STEPS, DEFAULT_TOP_K, estimate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    x = load_bundled("digits")[0]
    most = max(int(a.split(":")[1]) for a in sys.argv[1:])
    rng = np.random.default_rng(0)
    while len(x) < most:
        x = np.concatenate([x, x + 0.1 * rng.normal(size=x.shape).astype(x.dtype)])
    print(f"probes={DEFAULT_PROBES} steps={DEFAULT_STEPS} top_k={DEFAULT_TOP_K}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    for kernel, n in ((k, int(v)) for k, v in (a.split(":") for a in sys.argv[1:])):
        load = os.getloadavg()[0]
        exact, c_exact, w_exact = _timed(estimate, model, x[:n], method="exact", kernel=kernel)
        stoch, c_stoch, w_stoch = _timed(estimate, model, x[:n], method="stochastic",
                                         kernel=kernel)
        print(f"{kernel} N={n} D={exact.dim} load {load:.1f} | exact cpu {c_exact:.1f}s "
              f"wall {w_exact:.1f}s S={exact.entropy:.4f} | stochastic cpu {c_stoch:.1f}s "
              f"wall {w_stoch:.1f}s S={stoch.entropy:.4f}±{stoch.entropy_stderr:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
