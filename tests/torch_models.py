"""Small PyTorch models shared by the tests (importable by factories in subprocesses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def mlp(n_in: int = 6, width: int = 12, n_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, n_out))


def digits_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.tanh(self.c2(x))
        return self.fc(x.flatten(1))


class NormGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


def batchnorm_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.head(h), h


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class DataclassOut(TupleOut):
    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        logits, hidden = super().forward(x)
        return Output(logits=logits, hidden=hidden)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(x) + self.b(y)))


def reference_full(model: nn.Module, inputs: tuple[torch.Tensor, ...] | torch.Tensor,
                   select=lambda out: out) -> torch.Tensor:
    """The full kernel by explicit per-sample, per-output autograd.grad loops."""
    model.eval()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(args[0].shape[0]):
        out = select(model(*(a[i:i + 1] for a in args))).reshape(-1)
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params)]))
    jac = torch.stack(rows)
    return jac @ jac.T


def traced_from_full(full: torch.Tensor, n: int) -> torch.Tensor:
    o = full.shape[0] // n
    return full.reshape(n, o, n, o).diagonal(dim1=1, dim2=3).mean(-1)


class Recurrent(nn.Module):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on 64 features read as 8 steps of 8, then a
    linear head on the last step."""

    def __init__(self, cell: str = "GRU", batch_first: bool = True, layers: int = 1,
                 bidirectional: bool = False, hidden: int = 5) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, cell)(8, hidden, num_layers=layers, batch_first=batch_first,
                                     bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], 8, 8)
        y, _ = self.rnn(seq if self.batch_first else seq.transpose(0, 1))
        last = y[:, -1] if self.batch_first else y[-1]
        return self.head(last)
