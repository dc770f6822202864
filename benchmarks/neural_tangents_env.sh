#!/usr/bin/env bash
# Create (or check) a separate virtual environment with neural-tangents for the benchmark
# peers "nt-structured" and "nt-jacobian" (benchmarks/nt_peer.py, called by run.py).
#
#   bash benchmarks/neural_tangents_env.sh            # default: <repo>/.venv-nt
#   NT_VENV=/some/path bash benchmarks/neural_tangents_env.sh
#   PYTHON=python3.11 bash benchmarks/neural_tangents_env.sh
#
# Why a separate environment: neural-tangents 0.6.5 (the latest release, Jan 2024) reaches
# into JAX internals. Checked here on CPython 3.11 with neural-tangents 0.6.5:
#   jax/jaxlib 0.4.23, 0.4.24, 0.4.25: import, JACOBIAN_CONTRACTION and STRUCTURED_DERIVATIVES work;
#   0.4.26 and 0.4.30: import works, STRUCTURED_DERIVATIVES fails
#     (AttributeError: module 'jax.interpreters.ad' has no attribute 'source_info_util');
#   0.4.38, 0.5.0: fails.
# So 0.4.25 is the newest usable pair. Its package __init__ also imports TensorFlow (>= 2.15)
# and tf2jax unconditionally (for nt.experimental); TF 2.15 and this jax need numpy < 2.
# cvcore's own environment has jax 0.10 and numpy 2, so the two cannot share one venv.
#
# tensorflow-cpu is installed instead of the 500 MB "tensorflow" wheel; neural-tangents
# and tf2jax declare "tensorflow" and are therefore installed with --no-deps (their other
# requirements are listed explicitly below). Idempotent: a second run only re-checks.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NT_VENV:-$here/.venv-nt}"
python="${PYTHON:-python3}"

# Pinned; all have CPython 3.11 manylinux x86_64 wheels on PyPI (installed here).
NT_VERSION=0.6.5
PINNED=(
  "jax==0.4.25"
  "jaxlib==0.4.25"
  "numpy==1.26.4"
  "scipy==1.11.4"
  "tensorflow-cpu==2.15.1"
  "ml-dtypes==0.3.2"
  "frozendict==2.4.6"
  "absl-py==2.1.0"
  "dm-tree==0.1.8"
)
NODEPS=(
  "neural-tangents==$NT_VERSION"
  "tf2jax==0.3.6"
)

check() {
  "$venv/bin/python" - "$NT_VERSION" <<'EOF'
import sys, warnings
warnings.filterwarnings("ignore")
import jax, jaxlib, numpy
import neural_tangents as nt
assert nt.__version__ == sys.argv[1], (nt.__version__, sys.argv[1])
print(f"neural-tangents {nt.__version__}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"numpy {numpy.__version__}, devices {jax.devices()}")
EOF
}

if [ -x "$venv/bin/python" ] && check >/dev/null 2>&1; then
  echo "neural-tangents environment already present: $venv"
else
  echo "creating neural-tangents environment in $venv (downloads ~300 MB)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${PINNED[@]}"
  "$venv/bin/python" -m pip install -q --no-deps "${NODEPS[@]}"
fi
check
echo "python: $venv/bin/python"
echo "use:    python benchmarks/run.py --methods cvcore-structured,nt-structured,nt-jacobian --nt-python $venv/bin/python"
