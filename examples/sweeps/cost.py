# python examples/sweeps/cost.py  (from the repository root; writes cost.json)
# CPU seconds (time.process_time, one thread) of one training epoch and one record per
# (width, depth) of the digits grid, to estimate the grid's cost on an idle machine.
import json
import time

import torch
from threadpoolctl import threadpool_limits

from cvcore.record import ProbeSets, Recorder
from cvcore.sweep import load_config
from cvcore.sweep.data import load_split
from cvcore.sweep.models import build_model, initialise

torch.set_num_threads(1)
cfg = load_config("examples/sweeps/digits.toml")
split = load_split(cfg.data)
x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
probe = ProbeSets(train=x[:200], test=torch.from_numpy(split.x_test[:200]))
out = {}
with threadpool_limits(1):
    for depth in (1, 3, 6):
        for width in cfg.grid["width"]:
            torch.manual_seed(0)
            m = build_model("dense", {"width": width, "depth": depth, "activation": "relu"}, in_features=64, out_features=10)
            initialise(m, "flax")
            opt = torch.optim.Adam(m.parameters(), 1e-3)
            rec = Recorder(probe, variables=["entropy", "trace"], backend="torch")
            rec.record(0, m)  # warm-up
            t = time.process_time(); rec.record(1, m); r = time.process_time() - t
            t = time.process_time()
            for b in range(0, 1000, 100):
                opt.zero_grad(); torch.nn.functional.cross_entropy(m(x[b:b+100]), y[b:b+100]).backward(); opt.step()
            e = time.process_time() - t
            out[f"{width},{depth}"] = {"epoch_cpu": e, "record_cpu": r, "cell_cpu_estimate": 100 * e + 17 * r}
            print(width, depth, round(e, 3), round(r, 3), round(100 * e + 17 * r, 1), flush=True)
total = 6 * sum(v["cell_cpu_estimate"] for v in out.values())  # 2 activations x 3 seeds
out["grid_cpu_estimate"] = total
print("grid CPU s", total, "-> idle 2-core wall s >=", total / 2)
with open("cost.json", "w") as fh:
    json.dump(out, fh, indent=1)
