"""Time cvcore's torch NTK implementations against peer recipes on the same models.

Usage::

    python benchmarks/run.py --quick                 # a small subset, < 3 minutes on 2 CPU cores
    python benchmarks/run.py --device cuda           # the full grid on a GPU
    python benchmarks/run.py --models mlp256,cnn --n 64,256 --kernel full

Methods: ``cvcore-auto``, ``cvcore-structured``, ``cvcore-jacobian`` (``TorchBackend.ntk``),
``torchfunc`` (``vmap(jacrev)`` + one GEMM), ``jax`` (``vmap(jacrev)``, MLP only, same
weights), ``tf`` (``batch_jacobian``, MLP only, same weights), ``nngeometry``
(``GramMatrix``, if installed), ``nt-structured`` / ``nt-jacobian`` (neural-tangents'
``empirical_ntk_fn`` with ``STRUCTURED_DERIVATIVES`` / ``JACOBIAN_CONTRACTION``, MLP and CNN,
same weights; run by ``benchmarks/nt_peer.py`` in the separate venv that
``benchmarks/neural_tangents_env.sh`` creates, path ``--nt-python``). Peers are imported
lazily and skipped when missing.

Columns: median wall time over ``--reps`` runs after one warm-up; peak memory is
``torch.cuda.max_memory_allocated`` on CUDA for torch methods, otherwise the peak rise
of the process's resident set (RSS, sampled every 2 ms from ``/proc/self/statm``)
during one run (neural-tangents: the same, measured inside its own process; its
``jax.jit`` compile time is excluded and printed below the table); ``rel.err`` is ``max|K − K_ref| / max|K_ref|`` against the first
method's kernel (``cvcore-structured``); ``vs peer`` is the time divided by the fastest
peer's time on that row group. All computations are float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: Skip a Jacobian-materialising method when its Jacobian would exceed this many bytes.
JACOBIAN_LIMIT = 6 << 30
NT_METHODS = ("nt-structured", "nt-jacobian")
PEERS = ("torchfunc", "jax", "tf", "nngeometry", *NT_METHODS)
#: The neural-tangents venv's python (``--nt-python``); see benchmarks/neural_tangents_env.sh.
NT_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         ".venv-nt", "bin", "python")
QUICK = False
CVCORE = ("cvcore-structured", "cvcore-auto", "cvcore-jacobian")


# ------------------------------------------------------------------------------ models
def make_model(name: str) -> tuple[Any, Callable[[int], Any]]:
    """A torch model and a function giving ``n`` inputs for it (fixed seeds)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name in ("mlp256", "mlp1024"):
        w = 256 if name == "mlp256" else 1024
        model = nn.Sequential(nn.Linear(784, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                              nn.Linear(w, 10))
        return model.eval(), lambda n: torch.randn(n, 784, generator=torch.Generator().manual_seed(n))
    if name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
        return model.eval(), lambda n: torch.randn(n, 1, 28, 28,
                                                    generator=torch.Generator().manual_seed(n))
    if name == "transformer":
        return TransformerBlock().eval(), lambda n: torch.randn(
            n, 16, 64, generator=torch.Generator().manual_seed(n))
    if name == "gnn":
        return DenseGNN().eval(), lambda n: torch.randn(
            n, 16, 32, generator=torch.Generator().manual_seed(n))
    raise SystemExit(f"unknown model {name!r}; choose from mlp256, mlp1024, cnn, transformer, gnn")


def _torch_module() -> Any:
    import torch

    return torch.nn.Module


class TransformerBlock(_torch_module()):  # type: ignore[misc]
    """Pre-norm block: nn.MultiheadAttention (4 heads, d=64, 16 tokens) + 4× MLP, 10 outputs."""

    def __init__(self, d: int = 64) -> None:
        from torch import nn

        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x: Any) -> Any:
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.n2(x))
        return self.head(x.mean(1))


class DenseGNN(_torch_module()):  # type: ignore[misc]
    """Two message-passing layers on a fixed 16-node graph (dense normalised adjacency)."""

    def __init__(self, nodes: int = 16, d_in: int = 32, d: int = 64) -> None:
        import torch
        from torch import nn

        super().__init__()
        g = torch.Generator().manual_seed(1)
        adj = (torch.rand(nodes, nodes, generator=g) < 0.25).float()
        adj = ((adj + adj.T) > 0).float() + torch.eye(nodes)
        deg = adj.sum(1).rsqrt()
        self.register_buffer("adj", deg[:, None] * adj * deg[None, :])
        self.msg1, self.self1 = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.msg2, self.self2 = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Any) -> Any:
        import torch

        h = torch.relu(self.msg1(self.adj @ x) + self.self1(x))
        h = torch.relu(self.msg2(self.adj @ h) + self.self2(h))
        return self.head(h.mean(1))


# ------------------------------------------------------------------------------ methods
def cvcore_kernel(impl: str) -> Callable[..., Any]:
    def run(model: Any, x: Any, kernel: str, device: str) -> Any:
        from cvcore.backends.torch_backend import TorchBackend
        from cvcore.protocols import Implementation, KernelRequest

        req = KernelRequest(kernel=kernel, dtype="float32", device=device,
                            implementation=Implementation(impl), memory_budget=2 << 30)
        return TorchBackend().ntk(model, x, req).kernel

    return run


def _gram(j: Any, kernel: str) -> Any:
    """``J Jᵀ`` from ``(N, O, P)`` in either convention (works for torch, numpy, jax, tf)."""
    n, n_out = j.shape[0], j.shape[1]
    if kernel == "traced":
        flat = j.reshape(n, -1)
        return flat @ flat.T / n_out
    flat = j.reshape(n * n_out, -1)
    return flat @ flat.T


def torchfunc_kernel(model: Any, x: Any, kernel: str, device: str) -> Any:
    """The common recipe: ``vmap(jacrev(f))`` over samples, concatenate, one GEMM."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def single(p: Any, xi: Any) -> Any:
        return functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    j = torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in jac.values()], dim=2)
    return _gram(j, kernel).detach().cpu().numpy()


def _mlp_weights(model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    lins = [m for m in model if hasattr(m, "weight")]
    return [(m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy()) for m in lins]


def jax_kernel(model: Any, x: Any, kernel: str, device: str) -> Any:
    """``jax.vmap(jax.jacrev(f))`` on the same MLP weights (MLP models only)."""
    import jax
    import jax.numpy as jnp

    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in _mlp_weights(model)]
    xs = jnp.asarray(x.cpu().numpy())

    def f(p: Any, xi: Any) -> Any:
        h = xi
        for k, (w, b) in enumerate(p):
            h = h @ w.T + b
            if k < len(p) - 1:
                h = jnp.tanh(h)
        return h

    @jax.jit
    def build(p: Any, xs: Any) -> Any:
        jac = jax.vmap(jax.jacrev(f), in_axes=(None, 0))(p, xs)
        leaves = jax.tree_util.tree_leaves(jac)
        j = jnp.concatenate([v.reshape(v.shape[0], v.shape[1], -1) for v in leaves], axis=2)
        return _gram(j, kernel)

    return np.asarray(build(params, xs).block_until_ready())


def tf_kernel(model: Any, x: Any, kernel: str, device: str) -> Any:
    """TensorFlow ``GradientTape.batch_jacobian`` on the same MLP weights (MLP models only)."""
    import tensorflow as tf

    weights = [(tf.Variable(w.T), tf.Variable(b)) for w, b in _mlp_weights(model)]
    xs = tf.constant(x.cpu().numpy())
    flat = [v for pair in weights for v in pair]
    n = int(xs.shape[0])

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xs)
        h = xs
        for k, (w, b) in enumerate(weights):
            h = h @ w + b
            if k < len(weights) - 1:
                h = tf.tanh(h)
    # batch_jacobian differentiates w.r.t. a batched source; parameters are not batched,
    # so use the tape's jacobian with experimental_use_pfor (one vectorised call).
    jacs = tape.jacobian(h, flat, experimental_use_pfor=True)
    # each (N, O, *param) holds ∂f_io/∂θ for all samples; a sample's rows are its Jacobian
    j = tf.concat([tf.reshape(v, (n, v.shape[1], -1)) for v in jacs], axis=2)
    return _gram(j.numpy(), kernel)


def nngeometry_kernel(model: Any, x: Any, kernel: str, device: str) -> Any:
    """nngeometry's ``GramMatrix`` (per-layer hooks), layout (O, N, O, N) → ours."""
    import torch
    from nngeometry.gram import GramMatrix

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=len(x))
    gram = GramMatrix(model, loader, function=lambda *d: model(d[0])).data
    n_out, n = gram.shape[0], gram.shape[1]
    full = gram.permute(1, 0, 3, 2).reshape(n * n_out, n * n_out)
    if kernel == "full":
        return full.detach().cpu().numpy()
    return torch.einsum("iojo->ij", full.reshape(n, n_out, n, n_out)).div(n_out).cpu().numpy()


def _nt_export(model_name: str, model: Any, x: Any, where: str) -> str:
    """Write the model's weights (torch layout) and inputs for nt_peer.py; its model name."""
    if model_name.startswith("mlp"):
        arrays = {}
        for k, (w, b) in enumerate(_mlp_weights(model)):
            arrays[f"w{k}"], arrays[f"b{k}"] = w, b
        kind = "mlp"
    else:  # run.py's CNN: two convolutions and one linear head
        convs = [m for m in model if type(m).__name__ == "Conv2d"]
        lins = [m for m in model if type(m).__name__ == "Linear"]
        arrays = {}
        for k, m in enumerate(convs):
            arrays[f"c{k}"] = m.weight.detach().cpu().numpy()
            arrays[f"cb{k}"] = m.bias.detach().cpu().numpy()
        arrays["w0"] = lins[0].weight.detach().cpu().numpy()
        arrays["b0"] = lins[0].bias.detach().cpu().numpy()
        kind = "cnn"
    np.savez(os.path.join(where, "weights.npz"), **arrays)
    np.save(os.path.join(where, "inputs.npy"), x.detach().cpu().numpy().astype(np.float32))
    return kind


def nt_run(model_name: str, model: Any, x: Any, kernel: str, methods: list[str], reps: int
           ) -> dict[str, dict[str, Any]]:
    """Run benchmarks/nt_peer.py once for all neural-tangents methods of a row.

    Returns, per method, ``time``, ``cpu``, ``mem``, ``compile_s``, ``warmup_s`` and
    ``kernel`` (numpy, cvcore's layout), or ``error``."""
    impls = [m.removeprefix("nt-") for m in methods]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nt_peer.py")
    with tempfile.TemporaryDirectory(prefix="cvcore-nt-") as where:
        kind = _nt_export(model_name, model, x, where)
        cmd = [NT_PYTHON, script, "--model", kind, "--weights", os.path.join(where, "weights.npz"),
               "--inputs", os.path.join(where, "inputs.npy"), "--kernel", kernel,
               "--impls", ",".join(impls), "--reps", str(reps), "--slow", str(SLOW),
               "--out-dir", where]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        report_path = os.path.join(where, "timings.json")
        if proc.returncode != 0 or not os.path.exists(report_path):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:80]
            return {m: {"error": f"nt_peer.py exit {proc.returncode}: {tail}"} for m in methods}
        import json

        with open(report_path) as fh:
            report = json.load(fh)
        out: dict[str, dict[str, Any]] = {}
        for m, impl in zip(methods, impls):
            res = dict(report["results"][impl])
            if "kernel" in res:
                res["kernel"] = np.load(res["kernel"])
            res["versions"], res["import_s"] = report["versions"], report["import_s"]
            out[m] = res
        return out


METHODS: dict[str, Callable[..., Any]] = {
    "cvcore-structured": cvcore_kernel("structured"),
    "cvcore-auto": cvcore_kernel("auto"),
    "cvcore-jacobian": cvcore_kernel("jacobian"),
    "torchfunc": torchfunc_kernel,
    "jax": jax_kernel,
    "tf": tf_kernel,
    "nngeometry": nngeometry_kernel,
}
_MODULES = {"jax": "jax", "tf": "tensorflow", "nngeometry": "nngeometry"}


def skip_reason(method: str, model_name: str, model: Any, n: int, device: str) -> str | None:
    """Why a method is not run on this row (missing package, unsupported, too large)."""
    import importlib.util

    if method in _MODULES and importlib.util.find_spec(_MODULES[method]) is None:
        return f"{_MODULES[method]} not installed"
    if method in NT_METHODS:
        if not os.path.exists(NT_PYTHON):
            return (f"no neural-tangents venv at {NT_PYTHON}; run "
                    "bash benchmarks/neural_tangents_env.sh (or pass --nt-python)")
        if not (model_name.startswith("mlp") or model_name == "cnn"):
            return "recipe written for the MLP and CNN only"
        if device != "cpu":
            return "peer runs in its own CPU-only venv; compared on CPU only"
    if method == "nngeometry" and model_name == "cnn" and QUICK:
        return "about 30 s per run on 2 cores; run without --quick"
    if method in ("jax", "tf") and not model_name.startswith("mlp"):
        return "recipe written for the MLP only"
    if method in ("jax", "tf") and device != "cpu":
        return "peer runs on its own default device; compared on CPU only"
    params = sum(p.numel() for p in model.parameters())
    if method in ("torchfunc", "jax", "tf", "cvcore-jacobian", "nt-jacobian"):
        size = n * 10 * params * 4
        if method == "cvcore-jacobian" and n * 10 * n * 10 * params > 2e12:
            return f"estimated > 2e12 multiply-adds (Gram of {params} params)"
        if method != "cvcore-jacobian" and size > JACOBIAN_LIMIT:
            return f"Jacobian would take {size / 2**30:.0f} GiB"
    return None


# ------------------------------------------------------------------------------ measuring
class PeakRSS:
    """Peak rise of the resident set during a block (sampled from /proc/self/statm)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def rise(self) -> int:
        return self.peak - self.base


#: A method whose warm-up run takes longer than this (s) is timed once, not ``reps`` times.
SLOW = 5.0


def measure(fn: Callable[[], Any], device: str, reps: int, torch_method: bool
            ) -> tuple[float, float, int, str, Any]:
    """Median wall time, median CPU time, peak memory (bytes), how memory was measured,
    and the result. CPU time (all threads of this process) is steadier than wall time
    on a shared machine."""
    import torch

    t0 = time.perf_counter()
    result = fn()  # warm-up (compilation, allocator)
    if time.perf_counter() - t0 > SLOW:
        reps = 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times, cpu = [], []
    cuda = device.startswith("cuda") and torch_method
    for i in range(reps):
        last = i == reps - 1  # memory is measured during the last timed run
        if last and cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss = PeakRSS() if last and not cuda else None
        if rss is not None:
            rss.__enter__()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if rss is not None:
            rss.__exit__(None, None, None)
    if cuda:
        peak, how = torch.cuda.max_memory_allocated() - base, "cuda"
    else:
        peak, how = rss.rise if rss is not None else 0, "rss"
    return statistics.median(times), statistics.median(cpu), peak, how, result


# ------------------------------------------------------------------------------ driver
def run_row(model_name: str, n: int, kernel: str, methods: list[str], device: str,
            reps: int) -> list[dict[str, Any]]:
    import torch

    model, inputs = make_model(model_name)
    model = model.to(device)
    x = inputs(n).to(device)
    rows: list[dict[str, Any]] = []
    reference = None
    nt_results: dict[str, dict[str, Any]] | None = None
    for method in methods:
        row: dict[str, Any] = {"model": model_name, "N": n, "kernel": kernel, "method": method}
        reason = skip_reason(method, model_name, model, n, device)
        if reason is not None:
            rows.append({**row, "skip": reason})
            continue
        if method in NT_METHODS:  # one subprocess per row runs all of them
            if nt_results is None:
                todo = [m for m in methods if m in NT_METHODS
                        and skip_reason(m, model_name, model, n, device) is None]
                nt_results = nt_run(model_name, model, x, kernel, todo, reps)
            res = nt_results[method]
            if "error" in res:
                rows.append({**row, "skip": res["error"][:100]})
                continue
            k = np.asarray(res["kernel"], dtype=np.float64)
            if reference is None:
                reference = k
            err = float(np.abs(k - reference).max() / np.abs(reference).max())
            v = res["versions"]
            note = (f"{method}, {model_name} N={n} {kernel}: jax.jit compile {res['compile_s']:.2f} s, "
                    f"first call {res['warmup_s']:.2f} s (both excluded from the median; "
                    f"{res['reps']} timed), import {res['import_s']:.1f} s; neural-tangents "
                    f"{v['neural_tangents']}, jax {v['jax']}, numpy {v['numpy']}")
            rows.append({**row, "time": res["time"], "cpu": res["cpu"], "mem": res["mem"],
                         "mem_kind": "rss", "err": err, "note": note})
            continue
        try:
            t, c, mem, how, k = measure(lambda m=method: METHODS[m](model, x, kernel, device),
                                     device, reps, method not in ("jax", "tf"))
        except Exception as exc:  # a peer that cannot handle the model
            rows.append({**row, "skip": f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"})
            continue
        k = np.asarray(k, dtype=np.float64)
        if reference is None:
            reference = k
        err = float(np.abs(k - reference).max() / np.abs(reference).max())
        rows.append({**row, "time": t, "cpu": c, "mem": mem, "mem_kind": how, "err": err})
        del k
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    peer_times = [r["time"] for r in rows if r["method"] in PEERS and "time" in r]
    best = min(peer_times) if peer_times else None
    for r in rows:
        r["ratio"] = r["time"] / best if best and "time" in r else None
    return rows


def trace_row(n: int, device: str, reps: int, model_name: str = "mlp256") -> list[dict[str, Any]]:
    """Tr K from the diagonal vs from the full kernel (structured), same model and inputs."""
    from cvcore.backends.torch_backend import TorchBackend
    from cvcore.protocols import KernelRequest

    model, inputs = make_model(model_name)
    model = model.to(device)
    x = inputs(n).to(device)
    req = KernelRequest(kernel="full", dtype="float32", device=device, memory_budget=2 << 30)
    rows = []
    t_full, c_full, m_full, how, k = measure(lambda: np.trace(TorchBackend().ntk(model, x, req).kernel),
                                     device, reps, True)
    t_diag, c_diag, m_diag, _, d = measure(lambda: TorchBackend().diagonal(model, x, req).sum(),
                                   device, reps, True)
    err = abs(float(d) - float(k)) / abs(float(k))
    base = {"model": model_name, "N": n, "kernel": "full"}
    rows.append({**base, "method": "trace via full kernel", "time": t_full, "cpu": c_full, "mem": m_full,
                 "mem_kind": how, "err": 0.0, "ratio": 1.0})
    rows.append({**base, "method": "trace via diagonal", "time": t_diag, "cpu": c_diag, "mem": m_diag,
                 "mem_kind": how, "err": err, "ratio": t_diag / t_full})
    return rows


def format_notes(rows: list[dict[str, Any]]) -> str:
    notes = [r["note"] for r in rows if r.get("note")]
    return "\n".join(f"- {n}" for n in notes)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| model | N | kernel | method | median s | cpu s | peak MiB | rel.err | vs peer |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skip" in r:
            lines.append(f"| {r['model']} | {r['N']} | {r['kernel']} | {r['method']} | "
                         f"skipped: {r['skip']} | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}×" if r.get("ratio") else "–"
        lines.append(f"| {r['model']} | {r['N']} | {r['kernel']} | {r['method']} | "
                     f"{r['time']:.4f} | {r['cpu']:.3f} | {r['mem'] / 2**20:.0f} ({r['mem_kind']}) | "
                     f"{r['err']:.1e} | {ratio} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset, < 3 minutes on 2 cores")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    p.add_argument("--models", default=None,
                   help="comma list of mlp256, mlp1024, cnn, transformer, gnn")
    p.add_argument("--n", default=None, help="comma list of probe-set sizes")
    p.add_argument("--kernel", default="full", help="traced, full, or traced,full")
    p.add_argument("--methods", default=",".join(CVCORE + PEERS))
    p.add_argument("--reps", type=int, default=None, help="timed runs per method (median)")
    p.add_argument("--trace-n", type=int, default=None, help="N of the trace-only row (0: skip)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--allow-tf32", action="store_true",
                   help="let peers use TF32 on the GPU (PyTorch's default for convolutions); "
                        "off by default so every method computes in full float32 like cvcore")
    p.add_argument("--nt-python", default=NT_PYTHON,
                   help="python of the neural-tangents venv (benchmarks/neural_tangents_env.sh)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*batching rule.*")
    # Same precision for every method: cvcore turns TF32 off while it measures.
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.backends.cudnn.allow_tf32 = args.allow_tf32

    global QUICK, NT_PYTHON
    QUICK = args.quick
    NT_PYTHON = args.nt_python
    if args.quick:
        models = (args.models or "mlp256,cnn,transformer,gnn").split(",")
        sizes = [int(v) for v in (args.n or "64").split(",")]
        reps, trace_n = args.reps or 2, 256 if args.trace_n is None else args.trace_n
        if args.methods == parse([]).methods:  # TF's import alone takes ~10 s
            methods_default = [m for m in CVCORE + PEERS if m != "tf"]
            args.methods = ",".join(methods_default)
    else:
        models = (args.models or "mlp256,mlp1024,cnn,transformer,gnn").split(",")
        sizes = [int(v) for v in (args.n or "64,256,1024").split(",")]
        reps, trace_n = args.reps or 5, 1024 if args.trace_n is None else args.trace_n
    methods = args.methods.split(",")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model_name in models:
        for n in sizes:
            for kernel in args.kernel.split(","):
                new = run_row(model_name, n, kernel, methods, args.device, reps)
                rows.extend(new)
                print(format_table(new).split("\n", 2)[2], flush=True)
                if format_notes(new):
                    print(format_notes(new), flush=True)
    if trace_n:
        new = trace_row(trace_n, args.device, reps)
        rows.extend(new)
        print(format_table(new).split("\n", 2)[2], flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    table = format_table(rows)
    footer = (f"\n\n{device}; `{' '.join(['python', 'benchmarks/run.py', *sys.argv[1:]])}`; "
              f"total {time.perf_counter() - started:.0f} s")
    notes = format_notes(rows)
    footer += f"\n\n{notes}" if notes else ""
    print("\n" + table + footer)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + footer + "\n")


if __name__ == "__main__":
    main()
