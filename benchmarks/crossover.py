"""Wall time of ``estimate(method="exact")`` against ``method="stochastic"`` by kernel size.

Run: ``python benchmarks/crossover.py full:100 full:200 full:300 traced:500 traced:1000``
(``KERNEL:N`` pairs). The model is the digits MLP (64-16-10, 1210 parameters, seed 0) on
the first N bundled digits inputs, float32, ``probes=32 steps=30 top_k=10``; one line per
pair with both times and both entropies. ``method="auto"`` should choose exact where its
time is the smaller one (see docs/estimators.md).
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    import torch

    from cvcore.data_io import load_bundled
    from cvcore.estimate import estimate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    x = load_bundled("digits")[0]
    for kernel, n in ((k, int(v)) for k, v in (a.split(":") for a in sys.argv[1:])):
        t0 = time.perf_counter()
        exact = estimate(model, x[:n], method="exact", kernel=kernel)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        stoch = estimate(model, x[:n], method="stochastic", kernel=kernel, probes=32, steps=30)
        t_stoch = time.perf_counter() - t0
        print(f"{kernel} N={n} D={exact.dim} exact {t_exact:.1f}s S={exact.entropy:.4f} | "
              f"stochastic {t_stoch:.1f}s S={stoch.entropy:.4f}±{stoch.entropy_stderr:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
