"""neural-tangents peer for benchmarks/run.py, run by the neural-tangents venv's python.

Does not import cvcore or torch (the venv made by ``benchmarks/neural_tangents_env.sh``
has neither). ``run.py`` writes the torch model's ``state_dict`` (``.npz``) and the
inputs (``.npy``); this script rebuilds the same model with benchmarks/jax_models.py's
plain-JAX port ``apply_fn(params, x)`` (the one run.py's ``jax`` and ``cvcore-jax-*``
methods use), builds the empirical NTK with
``nt.empirical_ntk_fn(apply_fn, trace_axes=..., vmap_axes=0, implementation=...)``
under ``jax.jit``, and writes the kernel in cvcore's layout plus a JSON of timings::

    .venv-nt/bin/python benchmarks/nt_peer.py --model transformer --weights w.npz \
        --inputs x.npy --kernel full --impls structured,jacobian --reps 5 --out-dir /tmp/nt

Models: run.py's names, ``mlp256``, ``mlp1024``, ``cnn``, ``transformer``, ``gnn``.

Conventions. ``full``: ``trace_axes=()`` gives ``(N, N, O, O)``, transposed to
``(N, O, N, O)`` and reshaped to ``(N·O, N·O)`` (row ``i·O + o``). ``traced``:
``trace_axes=(-1,)``; neural-tangents divides the trace by the traced size
(``_trace_and_diagonal`` returns ``ntk / contract_size``), i.e. ``(1/O) Σ_o``, which is
cvcore's ``traced`` convention, so no rescaling is applied.

Timing. ``jax.jit(...).lower(...).compile()`` is timed separately (``compile_s``); then one
warm-up call and ``reps`` timed calls (``block_until_ready``); if the warm-up exceeds
``--slow`` seconds only one timed call is made. Reported: median wall time, median process
CPU time, and the peak rise of the resident set during the last timed call (sampled every
2 ms from ``/proc/self/statm``, as run.py does for CPU methods).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
from jax_models import MODELS, port
from peak_rss import PeakRSS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=MODELS, help="run.py's model name")
    p.add_argument("--weights", required=True, help=".npz of the torch model's state_dict")
    p.add_argument("--inputs", required=True, help=".npy of float32 inputs")
    p.add_argument("--kernel", default="full", choices=("full", "traced"))
    p.add_argument("--impls", default="structured,jacobian",
                   help="comma list of structured, jacobian, ntvp")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--slow", type=float, default=5.0,
                   help="time once if the warm-up takes longer than this (s)")
    p.add_argument("--out-dir", required=True, help="writes K_<impl>.npy and timings.json")
    args = p.parse_args(argv)

    t_import = time.perf_counter()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    import neural_tangents as nt
    t_import = time.perf_counter() - t_import

    impls = {"structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
             "jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION,
             "ntvp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS}
    with np.load(args.weights) as fh:
        weights = {k: fh[k].astype(np.float32) for k in fh.files}
    x = jax.numpy.asarray(np.load(args.inputs).astype(np.float32))
    apply_fn, params = port(args.model, weights)
    trace_axes: tuple[int, ...] = () if args.kernel == "full" else (-1,)
    os.makedirs(args.out_dir, exist_ok=True)
    report: dict[str, Any] = {
        "versions": {"neural_tangents": nt.__version__, "jax": jax.__version__,
                     "jaxlib": __import__("jaxlib").__version__, "numpy": np.__version__},
        "devices": [str(d) for d in jax.devices()], "import_s": t_import,
        "model": args.model, "kernel": args.kernel, "N": int(x.shape[0]), "results": {},
    }
    for name in args.impls.split(","):
        fn = nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, vmap_axes=0,
                                 implementation=impls[name])
        res: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(x, None, params).compile()
            res["compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            k = compiled(x, None, params).block_until_ready()  # warm-up
            res["warmup_s"] = time.perf_counter() - t0
            reps = 1 if res["warmup_s"] > args.slow else args.reps
            times, cpu = [], []
            for i in range(reps):
                rss = PeakRSS() if i == reps - 1 else None
                if rss is not None:
                    rss.__enter__()
                t0, c0 = time.perf_counter(), time.process_time()
                k = compiled(x, None, params).block_until_ready()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if rss is not None:
                    rss.__exit__(None, None, None)
                    res["mem"] = rss.rise
            res.update(time=statistics.median(times), cpu=statistics.median(cpu),
                       times=times, reps=reps)
            k = np.asarray(k)
            if args.kernel == "full":  # (N, N, O, O) -> (N, O, N, O) -> (N·O, N·O)
                n, _, o, _ = k.shape
                k = k.transpose(0, 2, 1, 3).reshape(n * o, n * o)
            path = os.path.join(args.out_dir, f"K_{name}.npy")
            np.save(path, k)
            res["kernel"] = path
        except Exception as exc:  # report, let the caller show a skipped row
            res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        report["results"][name] = res
        print(f"nt {name}: {json.dumps({k: v for k, v in res.items() if k != 'times'})}",
              file=sys.stderr, flush=True)
    with open(os.path.join(args.out_dir, "timings.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
