"""One short Keras ``fit`` with and without the cvcore callback, on whatever backend
KERAS_BACKEND names; run in-process for TensorFlow and as a script for JAX and torch
(``python tests/keras_integration_run.py DIR`` prints the result as JSON)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def fit(callbacks: list[Any], epochs: int = 3) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    g = np.random.default_rng(0)
    x, y = g.normal(size=(32, 4)).astype("float32"), g.normal(size=(32, 2)).astype("float32")
    model.history_ = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=True, verbose=0,
                               callbacks=callbacks)
    return model


def run(workdir: str) -> dict[str, Any]:
    import keras

    import cvcore
    from cvcore.integrations.keras import RecorderCallback

    probe = np.random.default_rng(5).normal(size=(10, 4)).astype("float32")
    out = Path(workdir) / keras.backend.backend()
    out.mkdir(parents=True, exist_ok=True)
    cb = RecorderCallback(probe, sink=out / "run.db", variables=["entropy", "trace"])
    model = fit([cb, keras.callbacks.CSVLogger(str(out / "log.csv"))])
    plain = fit([])
    (run_,) = cvcore.read_runs(out / "run.db")
    direct = cvcore.measure(model, probe, variables=["entropy", "trace"])
    final = {v["variable"]: v["value"] for v in run_["records"][-1]["values"]}
    batch = RecorderCallback(probe, unit="batch", every=3, variables=["trace"])
    fit([batch], epochs=2)  # 4 batches per epoch
    with open(out / "log.csv") as f:
        logged = [float(r["cv/probe/trace"]) for r in csv.DictReader(f)]
    sparse = RecorderCallback(probe, every=2, sink=out / "every2.db", variables=["trace"])
    model2 = fit([sparse, keras.callbacks.CSVLogger(str(out / "every2.csv"))])
    with open(out / "every2.csv") as f:
        sparse_csv = [(int(r["epoch"]), float(r["cv/probe/trace"])) for r in csv.DictReader(f)]
    (run2,) = cvcore.read_runs(out / "every2.db")
    return {
        "backend": keras.backend.backend(),
        "same_weights": all(np.array_equal(a, b) for a, b in
                            zip(model.get_weights(), plain.get_weights())),
        "steps": [r["step"] for r in run_["records"]],
        "losses": [r["loss"] for r in run_["records"]],
        "framework": run_["framework"],
        "final": final, "direct": {"entropy": direct.entropy, "trace": direct.trace},
        "history": [float(v) for v in model.history_.history["cv/probe/trace"]],
        "csv": logged,
        "batch_steps": [r.step for r in batch.recorder.store.records(batch.recorder.run_id)],
        "every2": {"steps": [r["step"] for r in run2["records"]],
                   "stored": [r["values"][0]["value"] for r in run2["records"]],
                   "history": [float(v) for v in model2.history_.history["cv/probe/trace"]],
                   "epochs": list(model2.history_.epoch), "csv": sparse_csv,
                   "direct": cvcore.measure(model2, probe, variables=["trace"]).trace},
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
