#!/usr/bin/env bash
# CI for the example plugin: install it into the current environment (non-editable, as a
# user gets it), run its tests against the installed copy, and drive `cv` end to end.
#
#   PYTHON=.venv/bin/python bash examples/numpy-backend-plugin/ci.sh
#
# PYTHON (default: `python` on PATH) must be an environment with cvcore installed; `cv` is
# taken from the same bin directory. The package is built without build isolation, so no
# package index is needed. On exit the package is uninstalled again unless it was
# installed before or KEEP_INSTALLED=1.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
found="$(command -v "${PYTHON:-python}")" || { echo "ci.sh: no python ${PYTHON:-python}" >&2; exit 1; }
bindir="$(cd "$(dirname "$found")" && pwd)"  # absolute, symlinks kept (a venv's python is one)
python="$bindir/$(basename "$found")"
cv="$bindir/cv"
work="$(mktemp -d)"
was_installed=0
"$python" -m pip show -q cvcore-numpy-mlp >/dev/null 2>&1 && was_installed=1

cleanup() {
    rm -rf "$work" "$here/build" "$here"/src/*.egg-info
    if [ "$was_installed" = 0 ] && [ "${KEEP_INSTALLED:-0}" != 1 ]; then
        "$python" -m pip uninstall -q -y cvcore-numpy-mlp
    fi
}
trap cleanup EXIT

fail() { echo "ci.sh: $*" >&2; exit 1; }

echo "== install cvcore-numpy-mlp"
"$python" -m pip install -q --no-build-isolation "$here"

echo "== its tests (against the installed package)"
(cd "$here" && "$python" -m pytest -q -rs -p no:cacheprovider tests) | tee "$work/pytest.txt"
! grep -qi "skipped" "$work/pytest.txt" || fail "expected no skipped tests, got some (see above)"

echo "== cv backends lists numpy-mlp"
"$cv" backends > "$work/backends.txt"
grep -q "numpy-mlp" "$work/backends.txt" || { cat "$work/backends.txt"; fail "expected numpy-mlp in 'cv backends', got none"; }
CVCORE_PLUGINS=data_loaders "$cv" backends > "$work/restricted.txt"
! grep -q "numpy-mlp" "$work/restricted.txt" || fail "expected CVCORE_PLUGINS=data_loaders to leave numpy-mlp out"

echo "== cv measure model.npz --data digits"
"$python" -c "from cvcore_numpy_mlp import NumpyMLP; NumpyMLP.random([64, 16, 10], seed=0).save('$work/model.npz')"
CVCORE_PLUGINS=data_loaders,numpy_mlp "$cv" measure "$work/model.npz" --data digits --samples 30 --json > "$work/out.json"
"$python" - "$work/out.json" <<'PY'
import json, math, sys
rows = json.load(open(sys.argv[1]))
assert len(rows) == 1, f"expected one row, got {len(rows)}"
row = rows[0]
assert row["backend"] == "numpy-mlp", f"expected backend 'numpy-mlp', got {row['backend']!r}"
assert (row["n_samples"], row["n_outputs"], row["kernel"]) == (30, 10, "traced"), row
assert row["trace"] > 0 and 0 < row["effective_entropy"] <= 1, row
assert math.isclose(sum(row["eigenvalues"]), row["trace"], rel_tol=1e-9), row
print(f"ok: backend {row['backend']}, trace {row['trace']:.4g}, entropy {row['entropy']:.4g}")
PY
echo "== example plugin CI passed"
