"""The ``transformer`` and ``ssm`` families: next-token prediction on a text that ships
with Python, or (``ssm`` only) the digits read row by row.

**The corpus** (``dataset = "text"``): the docstrings of :data:`CORPUS_MODULES` from the
running Python's standard library (each module's docstring, then those of its public
functions and classes and their public methods, in sorted order), as bytes: printable
ASCII and the newline are the 96 tokens (tab becomes a space, any other byte ``?``).
Nothing is downloaded or bundled; the text depends on the Python version, so its length
and SHA-256 are stored in every cell's tags. It is cut into non-overlapping windows of
``context + 1`` tokens, shuffled once with ``[data] seed``; a window's first ``context``
tokens are the input and the next token at every position the target. ``[data] train``
windows train (default 70 %), the others (or ``[data] test`` of them) are held out.

**The kernel** is the one of the next-token logits at a sequence's last position (96
outputs, traced by default): one sample is one sequence, probed on the first ``[probe]
train`` training and ``[probe] test`` held-out windows. Training minimises the
cross-entropy at every position; test accuracy is next-token accuracy over all positions.

**transformer**: token embedding + learned positions, ``depth`` causal pre-norm blocks of
``heads`` heads (``blocks.transformer_block``), LayerNorm, Linear(width, 96).

**ssm**: S4D-style diagonal state-space layers (Gu et al. 2022, "On the parameterization
and initialization of diagonal state space models"), real arithmetic only: per channel
``state`` complex modes ``A = -exp(a) + i b`` (S4D-Lin init: ``a = ln ½``, ``b = π n``),
step ``exp(log_dt)`` (log-uniform on [0.001, 0.1]), zero-order hold, the convolution
kernel ``K_l = 2 Re Σ_n C_n (exp(Δ A_n) - 1)/A_n · exp(l Δ A_n)`` applied causally,
plus ``D u``; each layer is ``x + Linear(GELU(SSM(LN(x))))``. On digits the 8 rows of an
image are 8 steps of 8 features and the class is read from the mean over steps.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.sweep.config import DataSpec, SweepConfig, TrainSpec
from cvcore.sweep.families.blocks import classification, probe_sets, transformer_block
from cvcore.sweep.train import Task

CORPUS_MODULES = ("string", "textwrap", "json", "functools", "itertools", "collections",
                  "heapq", "bisect", "fractions", "argparse", "random", "statistics",
                  "shlex", "difflib", "calendar", "pathlib", "contextlib", "dataclasses",
                  "enum", "typing")
VOCAB = 96
DEFAULT_CONTEXT = 32


#: Reads the docstrings in a fresh interpreter (see :func:`corpus_text`).
_READ = ("import sys, warnings; warnings.simplefilter('ignore', DeprecationWarning); "
         "from cvcore.sweep.families.sequence import _docstrings; "
         "sys.stdout.buffer.write(_docstrings().encode('utf-8'))")


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """The docstrings of :data:`CORPUS_MODULES` (see the module), joined by blank lines.

    Read in a fresh interpreter of the same Python: in a process that has imported other
    libraries the text can differ (a method without its own docstring inherits one, and
    Keras, once imported, changes an inherited docstring of ``collections``), and a cell
    must train on the same text whichever worker runs it.
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-I", "-c", _READ], capture_output=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise InputError(f"expected the standard library's docstrings, got an error reading "
                         f"them: {done.stderr.decode('utf-8', 'replace').strip()[-200:]}")
    return done.stdout.decode("utf-8")


def _docstrings() -> str:
    parts: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for method in sorted(vars(obj)):
                    if not method.startswith("_") and callable(vars(obj)[method]):
                        parts.append(inspect.getdoc(vars(obj)[method]) or "")
    return "\n\n".join(p for p in parts if p.strip())


def tokens(text: str) -> np.ndarray:
    """Byte-level tokens: printable ASCII 32..126 → 0..94, newline → 95, tab → space,
    anything else → ``?``."""
    raw = np.frombuffer(text.replace("\t", " ").encode("utf-8", errors="replace"),
                        dtype=np.uint8).astype(np.int64)
    out = raw - 32
    out[raw == 10] = 95
    out[(raw < 32) & (raw != 10) | (raw > 126)] = ord("?") - 32
    return out


@functools.lru_cache(maxsize=4)
def windows(spec: DataSpec, context: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train windows, test windows, corpus facts): rows of ``context + 1`` tokens."""
    text = corpus_text()
    ids = tokens(text)
    count = ids.size // (context + 1)
    rows = ids[:count * (context + 1)].reshape(count, context + 1)
    order = np.random.default_rng(spec.seed).permutation(count)
    n_train = spec.train if spec.train is not None else round(0.7 * count)
    if n_train >= count:
        raise InputError(f"[data] train: expected fewer than the {count} windows of the "
                         f"corpus (context {context}), got {n_train}")
    test = order[n_train:]
    if spec.test is not None:
        if spec.test > test.size:
            raise InputError(f"[data] test: expected at most {test.size} windows, got "
                             f"{spec.test}")
        test = test[:spec.test]
    facts = {"corpus_chars": len(text),
             "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
             "context": context}
    return rows[order[:n_train]], rows[test], facts


def task(config: SweepConfig, params: dict[str, Any], recipe: TrainSpec, seed: int) -> Task:
    import torch

    if recipe.loss != "cross_entropy":
        raise InputError(f"[train] loss: expected cross_entropy for the {config.family} "
                         f"family, got {recipe.loss!r}")
    if config.data.dataset == "digits":
        from cvcore.sweep.data import load_split

        split = load_split(config.data)
        x_tr, x_te = torch.from_numpy(split.x_train), torch.from_numpy(split.x_test)
        y_tr, y_te = torch.from_numpy(split.y_train), torch.from_numpy(split.y_test)
        rows_loss, rows_evaluate = classification(x_tr, y_tr, x_te, y_te)
        return Task(x_tr, y_tr, probe_sets(config, x_tr, x_te), rows_loss, rows_evaluate,
                    in_features=8, out_features=split.classes, family=config.family,
                    n_test=len(x_te))
    context = int(params.get("context", DEFAULT_CONTEXT))
    tr, te, facts = windows(config.data, context)
    x_tr, y_tr = torch.from_numpy(tr[:, :-1].copy()), torch.from_numpy(tr[:, 1:].copy())
    x_te, y_te = torch.from_numpy(te[:, :-1].copy()), torch.from_numpy(te[:, 1:].copy())

    def loss(model: Any, x: Any, y: Any) -> Any:
        logits = model.sequence(x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def scores(model: Any, x: Any, y: Any) -> tuple[float, float]:
        total, right = 0.0, 0.0
        for s in range(0, len(x), 256):
            logits = model.sequence(x[s:s + 256])
            yy = y[s:s + 256]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), yy.reshape(-1), reduction="sum"))
            right += float((logits.argmax(-1) == yy).sum())
        return total / y.numel(), right / y.numel()

    def evaluate(model: Any) -> dict[str, float]:
        tr_loss, tr_acc = scores(model, x_tr, y_tr)
        te_loss, te_acc = scores(model, x_te, y_te)
        return {"train_loss": tr_loss, "test_loss": te_loss, "train_accuracy": tr_acc,
                "test_accuracy": te_acc}

    return Task(x_tr, y_tr, probe_sets(config, x_tr, x_te), loss, evaluate,
                in_features=context, out_features=VOCAB, tags=facts, family=config.family,
                n_test=len(x_te))


def build(params: dict[str, Any], task: Task) -> Any:
    """A decoder-only transformer or an SSM, as ``task.family`` says."""
    return _ssm(params, task) if task.family == "ssm" else _transformer(params, task)


def _transformer(params: dict[str, Any], task: Task) -> Any:
    import torch
    from torch import nn

    width, depth, heads = int(params["width"]), int(params["depth"]), int(params.get("heads", 1))
    context = task.in_features

    class DecoderLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, width)
            self.position = nn.Parameter(torch.zeros(context, width))
            self.blocks = nn.Sequential(*[transformer_block(width, heads, causal=True)
                                          for _ in range(depth)])
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, VOCAB)
            nn.init.normal_(self.position, std=0.02)

        def sequence(self, x: Any) -> Any:
            """Logits at every position: (batch, context, 96)."""
            h = self.embed(x) + self.position[:x.shape[1]]
            return self.head(self.norm(self.blocks(h)))

        def forward(self, x: Any) -> Any:
            """The next-token logits after the last position (what the kernel measures)."""
            return self.sequence(x)[:, -1]

    return DecoderLM()


def s4d_kernel(log_dt: Any, log_a: Any, b: Any, c_re: Any, c_im: Any, length: int) -> Any:
    """The S4D convolution kernel (channels, length), zero-order hold, real arithmetic."""
    import torch

    dt = torch.exp(log_dt)[:, None]                         # (H, 1)
    ar, ai = -torch.exp(log_a) * dt, b * dt                 # Δ·A, (H, n)
    decay = torch.exp(ar)
    num_re, num_im = decay * torch.cos(ai) - 1, decay * torch.sin(ai)   # exp(ΔA) - 1
    den = ar * ar + ai * ai                                 # |ΔA|²; (e^{ΔA}-1)/A = Δ·num/ΔA
    q_re = dt * (num_re * ar + num_im * ai) / den
    q_im = dt * (num_im * ar - num_re * ai) / den
    cq_re, cq_im = c_re * q_re - c_im * q_im, c_re * q_im + c_im * q_re
    steps = torch.arange(length, dtype=log_dt.dtype)
    mag = torch.exp(ar[..., None] * steps)                  # (H, n, L)
    e_re, e_im = mag * torch.cos(ai[..., None] * steps), mag * torch.sin(ai[..., None] * steps)
    return 2 * (cq_re[..., None] * e_re - cq_im[..., None] * e_im).sum(dim=1)


def _ssm(params: dict[str, Any], task: Task) -> Any:
    import torch
    from torch import nn

    width, depth = int(params["width"]), int(params["depth"])
    state = int(params.get("state", 16))
    text = task.out_features == VOCAB

    class S4D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_dt = nn.Parameter(torch.rand(width) * (math.log(0.1) - math.log(0.001))
                                       + math.log(0.001))
            self.log_a = nn.Parameter(torch.full((width, state), math.log(0.5)))
            self.b = nn.Parameter(math.pi * torch.arange(state, dtype=torch.float32)
                                  .repeat(width, 1))
            self.c_re = nn.Parameter(torch.randn(width, state) * math.sqrt(0.5))
            self.c_im = nn.Parameter(torch.randn(width, state) * math.sqrt(0.5))
            self.d = nn.Parameter(torch.randn(width))

        def forward(self, u: Any) -> Any:          # (batch, L, H)
            length = u.shape[1]
            k = s4d_kernel(self.log_dt, self.log_a, self.b, self.c_re, self.c_im, length)
            lag = torch.arange(length)[:, None] - torch.arange(length)[None, :]
            toeplitz = k[:, lag.clamp(min=0)] * (lag >= 0)       # (H, L, L)
            return torch.einsum("hlj,bjh->blh", toeplitz, u) + self.d * u

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.ssm = nn.LayerNorm(width), S4D()
            self.mix = nn.Linear(width, width)

        def forward(self, x: Any) -> Any:
            return x + self.mix(torch.nn.functional.gelu(self.ssm(self.norm(x))))

    class SSM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed: nn.Module = nn.Embedding(VOCAB, width) if text else nn.Linear(8, width)
            self.layers = nn.Sequential(*[Layer() for _ in range(depth)])
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, task.out_features)

        def sequence(self, x: Any) -> Any:
            if not text:
                x = x.reshape(x.shape[0], 8, 8)
            return self.head(self.norm(self.layers(self.embed(x))))

        def forward(self, x: Any) -> Any:
            if text:
                return self.sequence(x)[:, -1]
            h = self.norm(self.layers(self.embed(x.reshape(x.shape[0], 8, 8))))
            return self.head(h.mean(dim=1))

    return SSM()
