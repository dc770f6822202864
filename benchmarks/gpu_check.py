"""GPU checks for the torch (and, where installed, JAX) backends: correctness on the
device against CPU float64, the default device, timings, and a D = 20,000 kernel.

    python benchmarks/gpu_check.py            # prints a markdown table

Run on a machine with a CUDA GPU (``docs/benchmarks.md`` records a run on an H200).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"  # CPU only to rehearse the script (with --small)
SMALL = "--small" in sys.argv


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()

import cvcore
from cvcore import plugins


def mlp(width: int = 256) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 10))


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class Block(torch.nn.Module):
    def __init__(self, d: int = 64, tokens: int = 16) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                      torch.nn.Linear(4 * d, d))
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.n2(x))
        return self.head(x.mean(1))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def timed(fn: Any, reps: int = 3) -> tuple[float, Any]:
    out = fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def recipe(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The torch.func tutorial recipe: vmap(jacrev) per sample, one GEMM (full kernel)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    j = torch.cat([v.flatten(2) for v in jac.values()], dim=2).flatten(0, 1)
    return j @ j.T


def main() -> None:
    torch.manual_seed(0)
    # The recipe computes in full float32 like cvcore (PyTorch lets cuDNN use TF32 by default).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(0) if GPU else "cpu (rehearsal)"
    print(f"torch {torch.__version__}, device {name}, cvcore "
          f"{cvcore.__version__}")
    backend = plugins.get_backend("torch")
    result = backend.ntk(mlp(32), torch.randn(4, 784), cvcore.api.make_request())
    print(f"default device: {result.device}")
    cases = {"mlp": (mlp(), lambda n: torch.randn(n, 784)),
             "cnn": (CNN(), lambda n: torch.randn(n, 1, 16, 16)),
             "transformer": (Block(), lambda n: torch.randn(n, 16, 64))}
    print("\n| model | check | value |\n|---|---|---|")
    for name, (model, make) in cases.items():
        x = make(8 if SMALL else 48)
        ref = cvcore.ntk(model, x, kernel="full", dtype="float64", device="cpu",
                         implementation="jacobian")
        for impl in ("jacobian", "structured"):
            k64 = cvcore.ntk(model, x, kernel="full", dtype="float64", device=DEV,
                             implementation=impl)
            k32 = cvcore.ntk(model, x, kernel="full", dtype="float32", device=DEV,
                             implementation=impl)
            print(f"| {name} | {DEV} {impl} float64 vs cpu float64 (rel) | {rel(k64, ref):.2e} |")
            print(f"| {name} | {DEV} {impl} float32 vs cpu float64 (rel) | {rel(k32, ref):.2e} |")
        cv32 = cvcore.measure(model, x, device=DEV)
        cv64 = cvcore.measure(model, x, device="cpu", dtype="float64")
        print(f"| {name} | entropy float32 {DEV} − float64 cpu | {cv32.entropy - cv64.entropy:.2e} |")
    print("\n| model | N | kernel | method | median s | peak GiB |\n|---|---|---|---|---|---|")
    sizes = ((("mlp", 16), ("cnn", 8), ("transformer", 8)) if SMALL else
             (("mlp", 256), ("mlp", 1024), ("cnn", 256), ("transformer", 256)))
    for name, n in sizes:
        model, make = cases[name]
        model = model.to(DEV)
        x = make(n).to(DEV)
        methods = {
            "cvcore-auto": lambda: cvcore.ntk(model, x, kernel="full", device=DEV),
            "cvcore-jacobian": lambda: cvcore.ntk(model, x, kernel="full", device=DEV,
                                                  implementation="jacobian"),
            "torch.func recipe": lambda: recipe(model, x),
        }
        for label, fn in methods.items():
            if GPU:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if GPU else 0
            try:
                seconds, _ = timed(fn)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if GPU else 0.0
                print(f"| {name} | {n} | full | {label} | {seconds:.4f} | {peak:.2f} |")
            except torch.OutOfMemoryError:
                print(f"| {name} | {n} | full | {label} | OOM | |")
            if GPU:
                torch.cuda.empty_cache()
    model, make = cases["mlp"]
    x = make(32 if SMALL else 1024).to(DEV)
    s_trace, _ = timed(lambda: cvcore.measure(model, x, kernel="full", device=DEV,
                                              variables="trace"))
    s_full, _ = timed(lambda: cvcore.ntk(model, x, kernel="full", device=DEV))
    print(f"\ntrace only, MLP N={x.shape[0]} full: {s_trace:.4f} s vs kernel {s_full:.4f} s "
          f"({s_full / s_trace:.1f}x)")
    x = make(20 if SMALL else 2000).to(DEV)
    start = time.perf_counter()
    k = cvcore.ntk(model, x, kernel="full", dtype="float64", device=DEV,
                   memory_budget="2GiB")
    print(f"D = {k.shape[0]} float64 kernel ({k.nbytes / 2**30:.2f} GiB) built in "
          f"{time.perf_counter() - start:.2f} s")
    try:
        import jax
        import jax.numpy as jnp

        print(f"\njax {jax.__version__} devices {jax.devices()}")
        small = mlp(64)
        params = [(p.detach().numpy().T.copy(), b.detach().numpy().copy()) for p, b in
                  ((small[0].weight, small[0].bias), (small[2].weight, small[2].bias),
                   (small[4].weight, small[4].bias))]

        def apply(ps: Any, xi: Any) -> Any:
            h = xi
            for i, (w, b) in enumerate(ps):
                h = h @ w + b
                if i < len(ps) - 1:
                    h = jnp.tanh(h)
            return h

        xs = np.random.default_rng(0).standard_normal((8 if SMALL else 64, 784)).astype(np.float32)
        kj = cvcore.ntk((apply, jax.tree_util.tree_map(jnp.asarray, params)), xs,
                        kernel="full", dtype="float64")
        kt = cvcore.ntk(small, xs, kernel="full", dtype="float64", device="cpu")
        print(f"jax (default device) vs torch cpu, float64 full kernel: rel {rel(kj, kt):.2e}")
    except ImportError as exc:
        print(f"jax not checked: {exc}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
