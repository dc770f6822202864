"""The ``vit`` family: a patch transformer on the bundled digits (8×8 images).

Each image is cut into (8/p)² patches of p×p pixels (p = ``patch``, 2 or 4), each patch
embedded by one Linear(p², width) plus a learned position; ``depth`` pre-norm transformer
blocks (``heads`` heads, no mask) follow, then a LayerNorm, the mean over patches and
Linear(width, 10). Inputs stay flat (64 features), so the probe sets are the dense
family's.
"""

from __future__ import annotations

from typing import Any

from cvcore.sweep.config import SweepConfig, TrainSpec
from cvcore.sweep.families.blocks import classification, probe_sets, transformer_block
from cvcore.sweep.train import Task

SIDE = 8


def task(config: SweepConfig, params: dict[str, Any], recipe: TrainSpec, seed: int) -> Task:
    import torch

    from cvcore.errors import InputError
    from cvcore.sweep.data import load_split

    if recipe.loss != "cross_entropy":
        raise InputError(f"[train] loss: expected cross_entropy for the vit family, got "
                         f"{recipe.loss!r}")
    split = load_split(config.data)
    x_tr, x_te = torch.from_numpy(split.x_train), torch.from_numpy(split.x_test)
    y_tr, y_te = torch.from_numpy(split.y_train), torch.from_numpy(split.y_test)
    loss, evaluate = classification(x_tr, y_tr, x_te, y_te)
    probe = probe_sets(config, x_tr, x_te)
    labels = {"train": y_tr, "test": y_te}
    return Task(x_tr, y_tr, probe, loss, evaluate,
                probe_targets={name: labels[name][:len(x)] for name, x in probe.items()},
                in_features=split.in_features, out_features=split.classes, n_test=len(x_te),
                tags={"patch": params.get("patch", 4)})


def build(params: dict[str, Any], task: Task) -> Any:
    import torch
    from torch import nn

    width, depth = int(params["width"]), int(params["depth"])
    heads, patch = int(params.get("heads", 1)), int(params.get("patch", 4))
    n_patches = (SIDE // patch) ** 2
    classes = task.out_features

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(patch * patch, width)
            self.position = nn.Parameter(torch.zeros(n_patches, width))
            self.blocks = nn.Sequential(*[transformer_block(width, heads, causal=False)
                                          for _ in range(depth)])
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, classes)
            nn.init.normal_(self.position, std=0.02)

        def forward(self, x: Any) -> Any:
            b = x.shape[0]
            img = x.reshape(b, SIDE // patch, patch, SIDE // patch, patch)
            tokens = img.permute(0, 1, 3, 2, 4).reshape(b, n_patches, patch * patch)
            h = self.blocks(self.embed(tokens) + self.position)
            return self.head(self.norm(h).mean(dim=1))

    return ViT()
