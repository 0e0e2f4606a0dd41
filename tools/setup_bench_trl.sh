#!/usr/bin/env bash
# Create .venv-bench-trl: a separate venv with TRL (GRPOTrainer) for bench/step.py's TRL side.
# Kept apart from .venv so that installing trl never moves the project's pinned transformers/accelerate.
# Python 3.11, torch 2.13.0+cpu (the local CPU wheel), trl + accelerate + datasets + math-verify.
# Where a package is also in requirements/cpu-constraints.txt it gets the same version as .venv
# (same transformers/tokenizers/datasets/math-verify on both sides of the benchmark).
# Idempotent: a second run with unchanged inputs returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bench-trl}
PYTHON=${PYTHON:-python3.11}
TRL_VERSION=${TRL_VERSION:-1.16.0}
CONSTRAINTS=requirements/cpu-constraints.txt
STAMP="$VENV/.bench-trl-setup"
want=$( (cat "$CONSTRAINTS" tools/setup_bench_trl.sh; echo "$TRL_VERSION") | sha256sum | cut -d' ' -f1)
check='import torch, transformers, accelerate, datasets, trl, math_verify; from trl import GRPOConfig, GRPOTrainer'
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "setup_bench_trl: $PYTHON not found (set PYTHON=...)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
echo "setup_bench_trl: installing trl==$TRL_VERSION into $VENV (first run takes a few minutes)"
# torch first, from the local CPU wheel (a bare 'torch' requirement would pull a multi-GB CUDA build).
pip install -q -c "$CONSTRAINTS" "torch==2.13.0"
# trl's needs (accelerate, datasets, transformers) + math-verify for the accuracy reward.
pip install -q -c "$CONSTRAINTS" "trl==$TRL_VERSION" accelerate datasets math-verify
# Never wanted beside CPU torch: PyPI's CUDA builds break `import transformers`.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "$check" \
  || { echo "setup_bench_trl: the installed stack does not import; see the messages above" >&2; exit 1; }
echo "$want" > "$STAMP"
"$VENV/bin/python" -c 'import torch, transformers, accelerate, trl; print(f"setup_bench_trl: ready ({trl.__name__} {trl.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, torch {torch.__version__})")'
