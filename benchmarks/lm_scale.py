"""Collective variables of a Pythia-160M-shaped language model, against the cost of the
forward and backward pass the measurement cannot avoid.

Run: ``python benchmarks/lm_scale.py`` (full size: GPT-NeoX, 12 layers, hidden 768, 12 heads,
vocabulary 50304, random weights from the config, no download; 16 sequences × 256 tokens),
``--small`` (2 layers, hidden 128, 8 × 64 tokens: under a minute on a CPU),
``--device cuda`` on a GPU. Other shapes: ``--batch``, ``--seq``, ``--layers``, ``--hidden``.

The text is this Python's own standard library source (``*.py`` beside ``os.py``, sorted,
concatenated), tokenized byte by byte (ids 0–255, no tokenizer): consecutive windows of
``--seq`` bytes, the first ``--batch`` of them.

Rows, each timed in process CPU seconds (all threads) and wall seconds, and as a ratio to
the baseline measured in the same run:

* ``forward+backward``: the baseline, one forward and one backward pass of the batch's mean
  next-token loss (what one training step cannot avoid);
* ``loss kernel``: ``K_ij = ∇ℓ_i·∇ℓ_j`` of each sequence's mean next-token loss, exact
  (``cvcore.estimate(..., output=next_token_loss, targets="outputs", residual="ones")``):
  trace, entropy, effective rank, target alignment with the losses, residual alignment
  with ``∂L/∂ℓ`` (the gradients' coherence ``‖Σ g_i‖² / (N Σ ‖g_i‖²)``);
* ``logits kernel``: each position with a next token a sample, the traced kernel of its
  ``V`` logits (mean over outputs), from vector-Jacobian products
  (``sample_axes=2, spectrum=False``): trace, target alignment with the next tokens
  (one-hot), residual alignment with ``softmax − onehot`` (each ± its standard error);
  ``--probes`` products per estimate (``--no-logits`` skips it);
* ``per-sample loop``: the loss kernel's trace from ``N`` separate forward and backward
  passes keeping ``N`` gradients, for comparison (skipped when they would take more than a
  quarter of the available memory; ``--no-loop``). ``--no-loss`` skips both loss rows.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def stdlib_tokens(batch: int, seq: int) -> np.ndarray:
    """``batch × seq`` byte ids from the standard library's source text."""
    root = Path(os.__file__).parent
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= batch * seq:
            break
    ids = np.frombuffer(bytes(data[:batch * seq]), dtype=np.uint8).astype(np.int64)
    return ids.reshape(batch, seq)


def build_model(layers: int, hidden: int, heads: int, device: str) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, vocab_size=50304, max_position_embeddings=2048,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        tie_word_embeddings=False, attn_implementation="eager")
    return transformers.GPTNeoXForCausalLM(config).eval().to(device)


def timed(fn: Any, device: str) -> tuple[Any, float, float]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def loop_row(model: Any, x: Any, n_params: int, row: Any, device: str) -> None:
    """The loss kernel the plain way, for comparison: each sequence's forward and backward
    pass on its own, its gradient kept (``N·P`` floats), then their Gram matrix."""
    import torch
    from cvcore.backends.torch.operator import next_token_loss

    from cvcore.memory import available_memory

    n = x.shape[0]
    free = available_memory()
    if free is not None and n * n_params * 4 > free // 4:
        print(f"| per-sample loop | skipped: {n} gradients need {n * n_params * 4 / 2**30:.1f} "
              f"GiB, more than a quarter of the {free / 2**30:.1f} GiB available |", flush=True)
        return
    params = [p for p in model.parameters() if p.requires_grad]

    def loop() -> float:
        grads = torch.empty((n, n_params), dtype=torch.float32, device=x.device)
        for i in range(n):
            xi = x[i:i + 1]
            g = torch.autograd.grad(next_token_loss(model(input_ids=xi), {"input_ids": xi}).sum(),
                                    params)
            grads[i] = torch.cat([t.reshape(-1) for t in g])
        return float(torch.trace(grads @ grads.T))

    trace, cpu, wall = timed(loop, device)
    row("per-sample loop (N backward passes): trace", trace, 0.0, cpu, wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--no-logits", action="store_true")
    parser.add_argument("--no-loop", action="store_true")
    parser.add_argument("--no-loss", action="store_true")
    args = parser.parse_args(argv)
    small = {"batch": 8, "seq": 64, "layers": 2, "hidden": 128}
    full = {"batch": 16, "seq": 256, "layers": 12, "hidden": 768}
    shape = {k: getattr(args, k) or (small if args.small else full)[k] for k in full}

    import torch
    from cvcore.backends.torch.operator import next_token_logits, next_token_loss

    from cvcore.estimate import estimate

    device = args.device
    model = build_model(shape["layers"], shape["hidden"], max(1, shape["hidden"] // 64), device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = stdlib_tokens(shape["batch"], shape["seq"])
    print(f"# GPT-NeoX {shape['layers']} layers, hidden {shape['hidden']}, {n_params / 1e6:.1f}M "
          f"parameters; {shape['batch']} x {shape['seq']} tokens; device {device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    x = torch.as_tensor(ids, device=device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = next_token_loss(model(input_ids=x), {"input_ids": x}).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up (allocator, kernels)
    loss, base_cpu, base_wall = timed(step, device)
    rows: list[tuple[str, str, float, float, float, float]] = []

    def row(name: str, value: float, se: float, cpu: float, wall: float) -> None:
        text = f"{value:.6g}" if not math.isnan(value) else "-"
        err = f"{se:.2g}" if se and not math.isnan(se) else ("exact" if se == 0 else "-")
        rows.append((name, text, cpu, wall, cpu / base_cpu, wall / base_wall))
        print(f"| {name} | {text} | {err} | {cpu:.1f} | {wall:.1f} | {cpu / base_cpu:.2f} "
              f"| {wall / base_wall:.2f} |", flush=True)

    print("| quantity | value | se | CPU s | wall s | CPU ratio | wall ratio |")
    print("|---|---|---|---|---|---|---|")
    row("forward+backward (mean loss)", loss, 0.0, base_cpu, base_wall)
    if not args.no_loss:
        est, cpu, wall = timed(lambda: estimate(
            model, ids, output=next_token_loss, targets="outputs", residual="ones",
            device=device), device)
        n = shape["batch"]
        row(f"loss kernel ({n}x{n}, {est.alignment_method}): trace", est.trace, 0.0, cpu, wall)
        row("  normalized trace", est.normalized_trace, 0.0, cpu, wall)
        row("  entropy", est.entropy, est.entropy_stderr, cpu, wall)
        row("  effective rank", est.effective_rank, est.entropy_stderr, cpu, wall)
        row("  target alignment (losses)", est.target_alignment, est.target_alignment_stderr, cpu,
            wall)
        row("  residual alignment (dL/dl = 1)", est.residual_alignment,
            est.residual_alignment_stderr, cpu, wall)
    if not args.no_loop and not args.no_loss:
        loop_row(model, x, n_params, row, device)
    if not args.no_logits:
        labels = ids[:, 1:].reshape(-1)
        lg, cpu, wall = timed(lambda: estimate(
            model, ids, output=next_token_logits, sample_axes=2, targets=labels,
            residual="cross_entropy", spectrum=False, alignment_probes=args.probes,
            device=device), device)
        positions = labels.size
        row(f"logits kernel ({positions} positions, {args.probes} probes): trace", lg.trace,
            lg.trace_stderr, cpu, wall)
        row("  normalized trace", lg.normalized_trace, lg.trace_stderr / positions, cpu, wall)
        row("  target alignment (next token)", lg.target_alignment, lg.target_alignment_stderr,
            cpu, wall)
        row("  residual alignment (softmax - onehot)", lg.residual_alignment,
            lg.residual_alignment_stderr, cpu, wall)
    print(f"# command: python benchmarks/lm_scale.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
