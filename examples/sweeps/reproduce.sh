#!/usr/bin/env bash
# The study of docs/reproduction.md: every sweep, then every figure under docs/figures/.
# Sweeps resume where they stopped; run from the repository root.
set -euo pipefail
CV=${CV:-cv}
PY=${PY:-python}
WORKERS=${WORKERS:-2}

for name in digits diabetes digits-mse digits-default-init; do
  $CV sweep examples/sweeps/$name.toml --out runs/$name --workers "$WORKERS" || true  # failures are listed in runs/$name/sweep.json
done

$CV scaling runs/digits --out docs/figures/digits \
  --contrast "width=12,1000 depth=3 activation=relu" \
  --contrast "depth=1,6 width=110 activation=relu" \
  --contrast "activation=relu,tanh width=110 depth=3"
$CV scaling runs/diabetes --out docs/figures/diabetes \
  --contrast "width=12,330 depth=3 activation=relu" \
  --contrast "depth=1,6 width=110 activation=relu" \
  --contrast "activation=relu,tanh width=110 depth=3"
$CV scaling runs/digits-mse --out docs/figures/digits-mse
$CV scaling runs/digits-default-init --out docs/figures/digits-default-init
$PY examples/sweeps/sensitivity.py runs/digits runs/digits-mse runs/digits-default-init \
  docs/figures/sensitivity_digits_depth3.png
