#!/usr/bin/env bash
# The prepared check for a single-GPU CUDA machine (e.g. one H200 with Python 3.12, CUDA torch and
# transformers preinstalled, no network, no vLLM/TE/megatron-core). Installs what is missing from the
# wheel folder .whl/ (filled beforehand with tools/fetch_gpu_wheels.sh) into a private target folder,
# then runs tools/gpu_check.py, which writes ONE JSON report. Usage (repository root):
#   bash tools/gpu_check.sh [--out runs/gpu_check/report.json] [--tiny] [--only parity,logprobs]
# Budget: under 8 minutes (a hard limit of 450 s on the measurement process). See tools/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=${WHL_DIR:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/megatron-grpo-gpu-check-site}
missing=$("$PY" - <<'PY'
import importlib.util as u
def has(m):
    try:
        return u.find_spec(m) is not None
    except ImportError:  # parent package missing
        return False
need = {"megatron.core": "megatron-core", "safetensors": "safetensors", "transformers": "transformers",
        "tokenizers": "tokenizers", "numpy": "numpy", "packaging": "packaging"}
print(" ".join(d for m, d in need.items() if not has(m)))
PY
)
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY has no torch: the GPU check needs the machine's CUDA torch" >&2; exit 2; }
if [ -n "$missing" ]; then
  ls "$WHL"/*.whl >/dev/null 2>&1 || { echo "error: missing $missing and no wheels in $WHL/ (fill it with tools/fetch_gpu_wheels.sh)" >&2; exit 2; }
  echo "[gpu_check] installing from $WHL/ into $SITE (missing: $missing)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    || { echo "error: installing the wheels of $WHL/ failed (see above)" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout -k 10 450 "$PY" tools/gpu_check.py "$@"
