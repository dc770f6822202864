"""What recording costs: the Recorder's time as a fraction of the training time.

Usage::

    python benchmarks/recorder_overhead.py --model mlp2m      # 2.1M-parameter MLP, 200-sample probe
    python benchmarks/recorder_overhead.py --model digits     # the make-demo MLP on the digits data

Each epoch is timed without recording; each record (one per epoch, before the epoch's
updates) is timed by the Recorder itself (the ``seconds`` it stores). The same seed gives
the same training with and without recording, so the two are timed on one run.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import cvcore
from cvcore.data_io import load_bundled


def setup(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    """The model, training inputs and labels, and the number of classes."""
    if name == "digits":
        x, y = load_bundled("digits")
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 10))
        return model, torch.from_numpy(x[:1500]), torch.from_numpy(y[:1500]), 10
    # 784 → 1200 → 1000 → 10 ReLU MLP on 6000 synthetic MNIST-sized inputs (2,153,210 params)
    rng = np.random.default_rng(0)
    x = rng.random((6000, 784), dtype=np.float32)
    y = rng.integers(0, 10, 6000)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1200), torch.nn.ReLU(),
                                torch.nn.Linear(1200, 1000), torch.nn.ReLU(),
                                torch.nn.Linear(1000, 10))
    return model, torch.from_numpy(x), torch.from_numpy(y), 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["digits", "mlp2m"], default="mlp2m")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--probe", type=int, default=200)
    parser.add_argument("--subsets", type=int, nargs=2, default=None, metavar=("K", "N"))
    parser.add_argument("--variables", default="entropy,trace")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x, y, _ = setup(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = cvcore.Recorder(x[:args.probe].numpy(), variables=args.variables.split(","),
                          subsets=tuple(args.subsets) if args.subsets else None)
    train_seconds = []
    for epoch in range(args.epochs + 1):
        rec.record(epoch, model)
        if epoch == args.epochs:
            break
        started = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        train_seconds.append(time.perf_counter() - started)
    cost = rec.cost()
    train = float(np.sum(train_seconds))
    print(f"{args.model}: {n_params} parameters, {len(x)} training samples, batch 64, "
          f"{args.epochs} epochs, probe {args.probe}"
          + (f" as {args.subsets[0]} subsets of {args.subsets[1]}" if args.subsets else "")
          + f", variables {args.variables}, torch threads {args.threads}, "
          f"{platform.processor() or platform.machine()}")
    print(f"training {train:.2f} s ({train / args.epochs:.3f} s per epoch); recording "
          f"{cost['total']:.2f} s for {cost['count']} records ({cost['mean']:.3f} s mean, "
          f"{cost['median']:.3f} s median, {cost['max']:.3f} s max); overhead "
          f"{cost['total'] / train:.1%} of the training time")


if __name__ == "__main__":
    main()
