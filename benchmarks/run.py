"""Time cvcore's NTK (torch and JAX backends) against peer recipes on the same models.

Usage::

    python benchmarks/run.py --quick                 # a small subset, < 3 minutes on 2 CPU cores
    python benchmarks/run.py --device cuda           # the full grid on a GPU
    python benchmarks/run.py --models mlp256,cnn --n 64,256 --kernel full

Methods: ``cvcore-auto``, ``cvcore-structured``, ``cvcore-jacobian`` (``TorchBackend.ntk``),
``cvcore-jax-auto``, ``cvcore-jax-structured``, ``cvcore-jax-jacobian`` (``cvcore.ntk`` on
the JAX port of the model, ``(apply_fn, params)``), ``torchfunc`` (``vmap(jacrev)`` + one
GEMM), ``jax`` (``jax.jit(vmap(jacrev))`` on the JAX port), ``tf`` (per-sample pfor
``GradientTape.jacobian`` in ``tf.vectorized_map`` on the TensorFlow port), ``nngeometry``
(``GramMatrix``, if installed), ``nt-structured`` / ``nt-jacobian`` (neural-tangents'
``empirical_ntk_fn`` with ``STRUCTURED_DERIVATIVES`` / ``JACOBIAN_CONTRACTION`` on the JAX
port, run by ``benchmarks/nt_peer.py`` in the separate venv that
``benchmarks/neural_tangents_env.sh`` creates, path ``--nt-python``). The ports
(benchmarks/jax_models.py, benchmarks/tf_models.py) cover all five models and take the
torch model's weights. Peers are imported lazily and skipped when missing.

Columns: median wall time over ``--reps`` runs after one warm-up (which absorbs
``jax.jit`` / ``tf.function`` compilation); peak memory is
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax_models import MODELS
from peak_rss import PeakRSS

#: Skip a Jacobian-materialising method when its Jacobian would exceed this many bytes.
JACOBIAN_LIMIT = 6 << 30
NT_METHODS = ("nt-structured", "nt-jacobian")
PEERS = ("torchfunc", "jax", "tf", "nngeometry", *NT_METHODS)
#: The neural-tangents venv's python (``--nt-python``); see benchmarks/neural_tangents_env.sh.
NT_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         ".venv-nt", "bin", "python")
QUICK = False
#: Left out of ``--quick``'s default methods: TF's import alone takes 4-10 s, and
#: cvcore-jax-jacobian repeats the jax recipe's work (~25 s of the budget on 2 cores).
QUICK_OFF = ("tf", "cvcore-jax-jacobian")
CVCORE = ("cvcore-structured", "cvcore-auto", "cvcore-jacobian")
#: cvcore's JAX backend on the JAX port of the model (benchmarks/jax_models.py).
CVCORE_JAX = ("cvcore-jax-auto", "cvcore-jax-structured", "cvcore-jax-jacobian")


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
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


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
@dataclass
class Case:
    """One row's torch model (by run.py name), inputs, kernel convention and device."""

    name: str
    model: Any
    x: Any
    kernel: str
    device: str

    def state(self) -> dict[str, np.ndarray]:
        """The model's ``state_dict`` as NumPy arrays (for the ports; dtype kept)."""
        return {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}

    def inputs(self) -> np.ndarray:
        """The inputs as a NumPy array (dtype kept)."""
        return self.x.detach().cpu().numpy()


#: A method: set up on a case (ports, weights, compilation wrappers; not timed), return
#: the call that is timed and gives the kernel.
Method = Callable[[Case], Callable[[], Any]]


def cvcore_kernel(impl: str) -> Method:
    """``TorchBackend.ntk`` with ``implementation=impl``."""
    def setup(case: Case) -> Callable[[], Any]:
        from cvcore.backends.torch.backend import TorchBackend

        from cvcore.protocols import Implementation, KernelRequest

        req = KernelRequest(kernel=case.kernel, dtype="float32", device=case.device,
                            implementation=Implementation(impl), memory_budget=2 << 30)
        return lambda: TorchBackend().ntk(case.model, case.x, req).kernel

    return setup


def cvcore_jax_kernel(impl: str) -> Method:
    """``cvcore.ntk((apply_fn, params), x, implementation=impl)`` on the JAX port."""
    def setup(case: Case) -> Callable[[], Any]:
        from jax_models import port

        import cvcore

        apply_fn, params = port(case.name, case.state())
        xs = case.inputs()
        return lambda: cvcore.ntk((apply_fn, params), xs, kernel=case.kernel, backend="jax",
                                  dtype="float32", implementation=impl,
                                  memory_budget=2 << 30)

    return setup


def _gram(j: Any, kernel: str) -> Any:
    """``J Jᵀ`` from ``(N, O, P)`` in either convention (works for torch, numpy, jax)."""
    n, n_out = j.shape[0], j.shape[1]
    if kernel == "traced":
        flat = j.reshape(n, -1)
        return flat @ flat.T / n_out
    flat = j.reshape(n * n_out, -1)
    return flat @ flat.T


def torchfunc_kernel(case: Case) -> Callable[[], Any]:
    """The common recipe: ``vmap(jacrev(f))`` over samples, concatenate, one GEMM."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    model = case.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def single(p: Any, xi: Any) -> Any:
        return functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),)).reshape(-1)

    def run() -> Any:
        jac = vmap(jacrev(single), in_dims=(None, 0))(params, case.x)
        j = torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in jac.values()], dim=2)
        return _gram(j, case.kernel).detach().cpu().numpy()

    return run


def jax_kernel(case: Case) -> Callable[[], Any]:
    """``jax.jit(vmap(jacrev(f)))`` over samples on the JAX port (same weights), one GEMM;
    compiled in the warm-up call."""
    import jax
    import jax.numpy as jnp
    from jax_models import port

    apply_fn, params = port(case.name, case.state())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    xs = jnp.asarray(case.inputs())

    def single(p: Any, xi: Any) -> Any:
        return apply_fn(p, xi[None])[0]

    @jax.jit
    def build(p: Any, xs: Any) -> Any:
        jac = jax.vmap(jax.jacrev(single), in_axes=(None, 0))(p, xs)
        leaves = jax.tree_util.tree_leaves(jac)
        j = jnp.concatenate([v.reshape(v.shape[0], v.shape[1], -1) for v in leaves], axis=2)
        return _gram(j, case.kernel)

    return lambda: np.asarray(build(params, xs).block_until_ready())


def tf_kernel(case: Case) -> Callable[[], Any]:
    """TensorFlow on the TF port (same weights): per-sample ``GradientTape.jacobian``
    (``experimental_use_pfor=True``, pfor over the outputs) inside ``tf.vectorized_map``
    over samples, in one ``tf.function`` (traced in the warm-up call); one GEMM."""
    import tensorflow as tf
    from tf_models import port

    apply_fn, params = port(case.name, case.state())
    flat = tf.nest.flatten(params)

    def per_sample(xi: Any) -> Any:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(flat)
            out = apply_fn(params, xi[None])[0]
        jacs = tape.jacobian(out, flat, experimental_use_pfor=True)
        return tf.concat([tf.reshape(v, (v.shape[0], -1)) for v in jacs], axis=1)

    jacobian = tf.function(lambda xs: tf.vectorized_map(per_sample, xs))
    xs = tf.constant(case.inputs())
    return lambda: _gram(jacobian(xs).numpy(), case.kernel)


def nngeometry_kernel(case: Case) -> Callable[[], Any]:
    """nngeometry's ``GramMatrix`` (per-layer hooks), layout (O, N, O, N) → ours."""
    import torch
    from nngeometry.gram import GramMatrix

    model, x = case.model, case.x

    def run() -> Any:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x),
                                             batch_size=len(x))
        gram = GramMatrix(model, loader, function=lambda *d: model(d[0])).data
        n_out, n = gram.shape[0], gram.shape[1]
        full = gram.permute(1, 0, 3, 2).reshape(n * n_out, n * n_out)
        if case.kernel == "full":
            return full.detach().cpu().numpy()
        return torch.einsum("iojo->ij", full.reshape(n, n_out, n, n_out)).div(n_out).cpu().numpy()

    return run


def nt_run(case: Case, methods: list[str], reps: int) -> dict[str, dict[str, Any]]:
    """Run benchmarks/nt_peer.py once for all neural-tangents methods of a row.

    Writes the torch ``state_dict`` (``.npz``) and the inputs (``.npy``) for it; returns,
    per method, ``time``, ``cpu``, ``mem``, ``compile_s``, ``warmup_s`` and ``kernel``
    (numpy, cvcore's layout), or ``error``."""
    impls = [m.removeprefix("nt-") for m in methods]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nt_peer.py")
    with tempfile.TemporaryDirectory(prefix="cvcore-nt-") as where:
        np.savez(os.path.join(where, "weights.npz"), **case.state())
        np.save(os.path.join(where, "inputs.npy"), case.inputs())
        cmd = [NT_PYTHON, script, "--model", case.name,
               "--weights", os.path.join(where, "weights.npz"),
               "--inputs", os.path.join(where, "inputs.npy"), "--kernel", case.kernel,
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


METHODS: dict[str, Method] = {
    "cvcore-structured": cvcore_kernel("structured"),
    "cvcore-auto": cvcore_kernel("auto"),
    "cvcore-jacobian": cvcore_kernel("jacobian"),
    **{m: cvcore_jax_kernel(m.removeprefix("cvcore-jax-")) for m in CVCORE_JAX},
    "torchfunc": torchfunc_kernel,
    "jax": jax_kernel,
    "tf": tf_kernel,
    "nngeometry": nngeometry_kernel,
}
_MODULES = {"jax": "jax", "tf": "tensorflow", "nngeometry": "nngeometry",
            **{m: "jax" for m in CVCORE_JAX}}
#: Methods that run outside torch (on their framework's default device).
FOREIGN = ("jax", "tf", *CVCORE_JAX)


def skip_reason(method: str, model_name: str, model: Any, n: int, device: str) -> str | None:
    """Why a method is not run on this row (missing package, unsupported, too large)."""
    import importlib.util

    if method in _MODULES and importlib.util.find_spec(_MODULES[method]) is None:
        return f"{_MODULES[method]} not installed"
    if method in NT_METHODS:
        if not os.path.exists(NT_PYTHON):
            return (f"no neural-tangents venv at {NT_PYTHON}; run "
                    "bash benchmarks/neural_tangents_env.sh (or pass --nt-python)")
        if device != "cpu":
            return "peer runs in its own CPU-only venv; compared on CPU only"
    if method == "nt-structured" and model_name == "transformer" and n > 128:
        # measured: 1.3 GB at N = 64, and its memory grows as N² (GNN: 0.33 -> 5.2 GB
        # from N = 64 to 256); a sweep reaching this row was killed for memory (24 GB)
        return f"about {1.3 * (n / 64) ** 2:.0f} GB (1.3 GB at N = 64, growing as N²)"
    if method == "nngeometry" and model_name == "cnn" and QUICK:
        return "about 30 s per run on 2 cores; run without --quick"
    if method in FOREIGN and device != "cpu":
        return "runs on its framework's default device; compared on CPU only"
    params = sum(p.numel() for p in model.parameters())
    if method in ("torchfunc", "jax", "tf", "cvcore-jacobian", "cvcore-jax-jacobian",
                  "nt-jacobian"):
        size = n * 10 * params * 4
        if method.startswith("cvcore") and n * 10 * n * 10 * params > 2e12:
            return f"estimated > 2e12 multiply-adds (Gram of {params} params)"
        if not method.startswith("cvcore") and size > JACOBIAN_LIMIT:
            return f"Jacobian would take {size / 2**30:.0f} GiB"
    return None


# ------------------------------------------------------------------------------ measuring
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
    """Time every method on one model, N and kernel; rel.err against the first method's
    kernel, ``vs peer`` against the fastest peer."""
    import torch

    model, inputs = make_model(model_name)
    case = Case(model_name, model.to(device), inputs(n).to(device), kernel, device)
    rows: list[dict[str, Any]] = []
    reference = None
    nt_results: dict[str, dict[str, Any]] | None = None
    for method in methods:
        row: dict[str, Any] = {"model": model_name, "N": n, "kernel": kernel, "method": method}
        reason = skip_reason(method, model_name, case.model, n, device)
        if reason is not None:
            rows.append({**row, "skip": reason})
            continue
        if method in NT_METHODS:  # one subprocess per row runs all of them
            if nt_results is None:
                todo = [m for m in methods if m in NT_METHODS
                        and skip_reason(m, model_name, case.model, n, device) is None]
                nt_results = nt_run(case, todo, reps)
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
            call = METHODS[method](case)
            t, c, mem, how, k = measure(call, device, reps, method not in FOREIGN)
        except Exception as exc:  # a peer that cannot handle the model
            first = (str(exc).splitlines() or [""])[0]
            rows.append({**row, "skip": f"{type(exc).__name__}: {first[:60]}"})
            continue
        k = np.asarray(k, dtype=np.float64)
        if reference is None:
            reference = k
        err = float(np.abs(k - reference).max() / np.abs(reference).max())
        rows.append({**row, "time": t, "cpu": c, "mem": mem, "mem_kind": how, "err": err})
        del k, call
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    peer_times = [r["time"] for r in rows if r["method"] in PEERS and "time" in r]
    best = min(peer_times) if peer_times else None
    for r in rows:
        r["ratio"] = r["time"] / best if best and "time" in r else None
    return rows


def trace_row(n: int, device: str, reps: int, model_name: str = "mlp256",
              backend: str = "torch") -> list[dict[str, Any]]:
    """Tr K from the diagonal vs from the full kernel (structured), same model and inputs;
    ``backend="jax"`` measures the model's JAX port with cvcore's JAX backend."""
    from cvcore.plugins import get_backend
    from cvcore.protocols import KernelRequest

    model, inputs = make_model(model_name)
    model = model.to(device)
    x = inputs(n).to(device)
    req = KernelRequest(kernel="full", dtype="float32", device=device, memory_budget=2 << 30)
    engine = get_backend(backend)
    if backend == "jax":
        from jax_models import port

        subject, data = port(model_name, Case(model_name, model, x, "full", device).state()), \
            x.cpu().numpy()
    else:
        subject, data = model, x
    rows = []
    t_full, c_full, m_full, how, k = measure(lambda: np.trace(engine.ntk(subject, data, req).kernel),
                                             device, reps, backend == "torch")
    t_diag, c_diag, m_diag, _, d = measure(lambda: engine.diagonal(subject, data, req).sum(),
                                           device, reps, backend == "torch")
    err = abs(float(d) - float(k)) / abs(float(k))
    base = {"model": model_name, "N": n, "kernel": "full"}
    label = "" if backend == "torch" else f" ({backend})"
    rows.append({**base, "method": f"trace via full kernel{label}", "time": t_full, "cpu": c_full,
                 "mem": m_full, "mem_kind": how, "err": 0.0, "ratio": 1.0})
    rows.append({**base, "method": f"trace via diagonal{label}", "time": t_diag, "cpu": c_diag,
                 "mem": m_diag, "mem_kind": how, "err": err, "ratio": t_diag / t_full})
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
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--n", default=None, help="comma list of probe-set sizes")
    p.add_argument("--kernel", default="full", help="traced, full, or traced,full")
    p.add_argument("--methods", default=",".join(CVCORE + CVCORE_JAX + PEERS))
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
        if args.methods == parse([]).methods:
            args.methods = ",".join(m for m in CVCORE + CVCORE_JAX + PEERS if m not in QUICK_OFF)
    else:
        models = (args.models or ",".join(MODELS)).split(",")
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
        if args.device == "cpu":
            new += trace_row(trace_n, args.device, reps, backend="jax")
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
