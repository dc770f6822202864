"""Train a small MLP on the bundled digits data and save a checkpoint per epoch.

Used by ``make demo``: afterwards ``cv measure runs/digits/epoch_*.pt --data digits``
shows how the NTK's trace and entropy evolve over training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

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
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_np, y_np = load_bundled("digits")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = make_model(args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args.out.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs + 1):
        model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y).item()
            acc = (model(x).argmax(1) == y).float().mean().item()
        torch.save(model, args.out / f"epoch_{epoch}.pt")
        print(f"epoch {epoch:2d}  loss {loss:.4f}  accuracy {acc:.3f}")
        if epoch == args.epochs:
            break
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


if __name__ == "__main__":
    main()
