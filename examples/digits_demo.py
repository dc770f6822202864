"""Train a small MLP on the bundled digits data, recording its NTK every epoch.

Used by ``make demo``: a :class:`cvcore.Recorder` measures the entropy and trace of the
empirical NTK on a fixed train and test probe (10 subsets of 20 samples each) before
every epoch's updates, with the kernel's alignment to the labels (``target_alignment``)
and its motion (``kernel_distance_init``, ``kernel_velocity``, the top eigenvalues), and
writes them to ``runs/digits/run.db``; afterwards
``cv report runs/digits/run.db`` and ``cv plot runs/digits/run.db --out ...`` show them.
``--checkpoints`` also saves ``epoch_{N}.pt`` for ``cv measure``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import cvcore
from cvcore.data_io import load_bundled


def make_model(width: int = 64) -> torch.nn.Module:
    """64 → width → width → 10 tanh MLP (the architecture the checkpoints hold)."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.Tanh(),
        torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subsets", type=int, nargs=2, default=(10, 20), metavar=("K", "N"))
    parser.add_argument("--no-record", action="store_true", help="train without recording")
    parser.add_argument("--checkpoints", action="store_true", help="also save epoch_N.pt")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a net this small gains nothing from more, and "
                             "they contend badly on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    x_np, y_np = load_bundled("digits")
    order = np.random.default_rng(args.seed).permutation(len(x_np))
    train, test = order[:1500], order[1500:]
    x, y = torch.from_numpy(x_np[train]), torch.from_numpy(y_np[train])
    x_test, y_test = torch.from_numpy(x_np[test]), torch.from_numpy(y_np[test])
    model = make_model(args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / "run.db"
    if not args.no_record:  # a fresh store for each demo run (a store can hold many runs)
        for old in (sink, sink.with_name("run.db-wal"), sink.with_name("run.db-shm")):
            old.unlink(missing_ok=True)
    rec = None if args.no_record else cvcore.Recorder(
        {"train": x_np[train[:200]], "test": x_np[test[:200]]}, sink=sink,
        subsets=tuple(args.subsets), variables=["entropy", "trace"], seed=args.seed,
        # the kernel's alignment with the labels and its motion between records
        targets={"train": y_np[train[:200]], "test": y_np[test[:200]]}, dynamics=True,
        name=f"digits mlp width {args.width} seed {args.seed}",
        tags={"width": args.width, "seed": args.seed, "lr": 0.1, "dataset": "digits"})
    train_seconds = 0.0
    for epoch in range(args.epochs + 1):
        model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y).item()
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        if rec is not None:
            rec.record(epoch, model, loss=loss, test_accuracy=acc)
        if args.checkpoints:
            torch.save(model, args.out / f"epoch_{epoch}.pt")
        print(f"epoch {epoch:2d}  loss {loss:.4f}  test accuracy {acc:.3f}")
        if epoch == args.epochs:
            break
        started = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        train_seconds += time.perf_counter() - started
    if rec is not None:
        cost = rec.cost()
        rec.close()
        print(f"training {train_seconds:.2f} s, recording {cost['total']:.2f} s "
              f"({cost['count']} records, {cost['total'] / train_seconds:.2f}× the training "
              f"time) -> {sink}")


if __name__ == "__main__":
    main()
