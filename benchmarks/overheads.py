"""What cvcore's safety and per-layer options cost on the benchmark models.

Usage::

    python benchmarks/overheads.py --models mlp256,cnn --n 64,256 --reps 5

For each model and probe size (float32, ``implementation="auto"``, one torch thread), the
least CPU time of this process over ``--reps`` calls after one warm-up, of

* ``auto``: ``cvcore.api.build`` as shipped (the structured path's row checks on);
* ``no-checks``: the same with the row checks of ``backends/torch/rowcheck.py`` stubbed
  out (what the structured path cost before it checked anything);
* ``verify``: ``build`` with ``verify=True``;
* ``per-layer``: ``build(..., per_layer=True)``.

CPU time (and its minimum) rather than wall time, because the machine these numbers come
from is shared: wall times there swing by 2-5x with the other processes' load.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from run import make_model


@contextlib.contextmanager
def no_row_checks() -> Iterator[None]:
    from cvcore.backends.torch import rowcheck as rc

    saved = rc.forward_check, rc.backward_check
    rc.forward_check = lambda prep, x, request, out, cap, structured: (False, set())
    rc.backward_check = lambda out, zs, grads, seed=0: set()
    try:
        yield
    finally:
        rc.forward_check, rc.backward_check = saved


def cpu_least(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    import torch

    from cvcore.api import build, make_request

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp256,cnn")
    parser.add_argument("--n", default="64,256")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain, checked = make_request(), make_request(verify=True)
    print("| model | N | auto (s) | no-checks | verify | per-layer |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, inputs = make_model(name)
        for n in (int(v) for v in args.n.split(",")):
            probe = inputs(n)

            def timed(request: Any, per_layer: bool = False, model: Any = model,
                      x: Any = probe) -> float:
                return cpu_least(lambda: build(model, x, request=request, per_layer=per_layer),
                                 args.reps)

            auto = timed(plain)
            with no_row_checks():
                bare = timed(plain)
            verify = timed(checked)
            layers = timed(plain, per_layer=True)
            print(f"| {name} | {n} | {auto:.4f} | {bare:.4f} ({auto / bare:.2f}x) "
                  f"| {verify:.4f} ({verify / auto:.2f}x) | {layers:.4f} ({layers / auto:.2f}x) |",
                  flush=True)


if __name__ == "__main__":
    main()
