"""Language-model kernels on a GPT-2-small-sized model (random weights, offline).

Two parts, each printing one JSON line per measurement on stdout (progress on stderr):

* ``--part gpt2``: GPT-2 small's configuration (12 layers, width 768, 12 heads,
  vocabulary 50257), 16 sequences of 32 tokens: the next-token log-probability kernel
  (one output per sample, exact), then the sketched last-position logits kernel for
  ``m`` projections (time only: the exact kernel over 50257 outputs is out of reach).
* ``--part error``: the sketch's error against the exact traced kernel on a small
  vocabulary (a 2-layer, width-32 GPT-2, ``--vocab`` tokens, float64), for each ``m`` and seed: the
  kernel's actual relative error (Frobenius) next to the standard error it reported.

Usage::

    python benchmarks/language.py --part gpt2 --projections 8,16,32,64
    python benchmarks/language.py --part error --projections 8,16,32,64 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int, seed: int = 0):  # type: ignore[no-untyped-def]
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                     vocab_size=vocab, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(vocab: int, n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def part_gpt2(args: argparse.Namespace) -> None:
    import cvcore
    from cvcore.api import make_request
    from cvcore.sketch import sketched_kernel

    model = gpt2(12, 768, 12, 50257)
    params = sum(p.numel() for p in model.parameters())
    x = tokens(50257, args.n, args.length)
    log(f"GPT-2 small config: {params} parameters; {args.n} sequences of {args.length} tokens")
    started, cpu = time.perf_counter(), time.process_time()
    k = cvcore.ntk(model, x, output="next-token", memory_budget=args.budget)
    seconds = time.perf_counter() - started
    print(json.dumps({"part": "gpt2", "output": "next-token", "seconds": round(seconds, 1),
                      "cpu_seconds": round(time.process_time() - cpu, 1),
                      "trace": float(np.trace(k)), "params": params}), flush=True)
    log(f"next-token kernel: {seconds:.1f} s")
    request = make_request(memory_budget=args.budget)
    for m in args.projections:
        started, cpu = time.perf_counter(), time.process_time()
        sk = sketched_kernel(model, x, projections=m, request=request, progress=log)
        seconds = time.perf_counter() - started
        st = sk.statistics
        print(json.dumps({"part": "gpt2", "output": "last", "projections": m,
                          "seconds": round(seconds, 1),
                          "cpu_seconds": round(time.process_time() - cpu, 1), "trace": st.trace,
                          "trace_stderr": st.trace_stderr,
                          "kernel_stderr": st.relative_error}), flush=True)
        log(f"sketch m={m}: {seconds:.1f} s, reported relative error {st.relative_error:.3f}")


def part_error(args: argparse.Namespace) -> None:
    import cvcore
    from cvcore.api import make_request
    from cvcore.sketch import sketched_kernel

    vocab = args.vocab
    model = gpt2(2, 32, 4, vocab)
    x = tokens(vocab, args.n, args.length)
    started, cpu = time.perf_counter(), time.process_time()
    exact = cvcore.ntk(model, x, dtype="float64")
    print(json.dumps({"part": "error", "vocab": vocab, "exact": True,
                      "seconds": round(time.perf_counter() - started, 2),
                      "cpu_seconds": round(time.process_time() - cpu, 2)}), flush=True)
    request = make_request(dtype="float64")
    norm = float(np.linalg.norm(exact))
    for m in args.projections:
        for seed in range(args.seeds):
            started, cpu = time.perf_counter(), time.process_time()
            sk = sketched_kernel(model, x, projections=m, seed=seed, request=request)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            st = sk.statistics
            actual = float(np.linalg.norm(st.kernel - exact)) / norm
            print(json.dumps({"part": "error", "vocab": vocab, "projections": m, "seed": seed,
                              "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                              "actual_error": actual,
                              "reported_error": st.relative_error,
                              "trace_z": (st.trace - float(np.trace(exact))) / st.trace_stderr}),
                  flush=True)
            log(f"m={m} seed={seed}: actual {actual:.3f}, reported {st.relative_error:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("gpt2", "error"), required=True)
    parser.add_argument("--projections", default="8,16,32,64")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--budget", default="6GB")
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()
    args.projections = [int(m) for m in args.projections.split(",") if m]
    (part_gpt2 if args.part == "gpt2" else part_error)(args)


if __name__ == "__main__":
    main()
