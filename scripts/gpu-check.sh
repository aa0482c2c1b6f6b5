#!/usr/bin/env bash
# The GPU check (docs/gpu.md): the GPU tests, then a gpt-oss-20b-shaped random-weight model built on
# the device, decoding at batch 1, 16 and 64 with dense and MXFP4 experts; ends with one JSON line.
# Needs torch only (pytest for the tests, triton for the kernels): on a bare GPU machine, from the
# repository root:
#
#   bash scripts/gpu-check.sh          # the GPU
#   bash scripts/gpu-check.sh --cpu    # the same steps with the tiny preset on the CPU (CI runs this)
#
# Extra arguments go to the decode check: --batch-sizes 1,16,64 --input-len 128 --steps 16 --preset NAME
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cpu=()
if [ "${1:-}" = "--cpu" ]; then cpu=(--cpu); shift; fi

# On the GPU the kernels' tests run natively too; with --cpu they are left to the test suite, which
# runs them in Triton's interpreter already (minutes of CI time saved).
marks="gpu or kernels"; [ ${#cpu[@]} -gt 0 ] && marks="gpu and not kernels"
echo "== tests marked $marks (gpu ones skip without CUDA)"
if "$PY" -c "import pytest" 2>/dev/null; then
  mapfile -t files < <(grep -rlE "pytest.mark.(gpu|kernels)" tests --include="*.py" | sort)
  "$PY" -m pytest -q -p no:cacheprovider -m "$marks" "${files[@]}"
else
  echo "pytest is not installed here: the tests are skipped"
fi

echo "== decode check"
if [ ${#cpu[@]} -gt 0 ]; then
  "$PY" -m cluster.bench.device_check --cpu --batch-sizes 1,16 --input-len 32 --steps 3 "$@"
else
  "$PY" -m cluster.bench.device_check "$@"
fi
