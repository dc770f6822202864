"""The kernel against the task, before and after training: target and residual alignment.

A 64-64-10 tanh MLP (torch, seed 0) on the first 200 bundled digits is measured with
``cvcore.measure(model, x, targets=y)`` before and after 200 steps of full-batch gradient
descent (lr 0.05) on the squared loss with one-hot targets. It prints, for each, the
centred kernel-target alignment, the residual's Rayleigh quotient rᵀKr / (‖r‖² Tr K), the
residual's share in the kernel's top-10 eigenmodes, ‖r‖ and the entropy; then the kernel
distance (1 − cos) and the top-10 eigenspace overlap between the two kernels
(``cvcore.dynamics``), and the CPU seconds of ``measure`` with and without targets.
Runs in seconds on a CPU (README.md, "The kernel against the task")::

    OMP_NUM_THREADS=1 .venv/bin/python examples/kernel_dynamics.py
"""

from __future__ import annotations

import time

import torch

import cvcore
from cvcore.data_io import load_bundled


def main() -> None:
    torch.manual_seed(0)
    x_all, y_all = load_bundled("digits")
    x, y = torch.from_numpy(x_all[:200]), y_all[:200]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    k0 = cvcore.ntk(model, x)
    t0 = time.process_time()
    before = cvcore.measure(model, x, targets=y)
    t1 = time.process_time()
    cvcore.measure(model, x)
    t2 = time.process_time()

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y), 10).float()
    for _ in range(200):
        opt.zero_grad()
        loss = ((model(x) - onehot) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
    after = cvcore.measure(model, x, targets=y)
    k1 = cvcore.ntk(model, x)

    for name, m in (("before", before), ("after", after)):
        d = m.dynamics
        print(f"{name}: A = {d.target_alignment:.3f}, "
              f"rKr/(|r|^2 TrK) = {d.residual_alignment:.3f}, "
              f"c(10) = {d.residual_fractions[9]:.3f}, |r| = {d.residual_norm:.2f}, "
              f"entropy = {m.variables.entropy:.3f}")
    print(f"kernel distance {cvcore.dynamics.kernel_distance(k0, k1):.3f}, "
          f"top-10 eigenspace overlap {cvcore.dynamics.eigenspace_overlap(k0, k1, 10):.3f}")
    print(f"CPU s: measure with targets {t1 - t0:.3f}, without {t2 - t1:.3f}")


if __name__ == "__main__":
    main()
