#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels tools/gpu_check.sh installs on a GPU machine without network:
# megatron-core for CPython 3.12 manylinux x86-64 and its small pure-Python needs that such a machine
# (CUDA torch + transformers preinstalled) may lack. Run it here, where pip reaches an index.
# Together well under the 64 MiB a device call may carry (megatron-core's wheel is the bulk).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL_DIR:-.whl}
mkdir -p "$WHL"
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$WHL" "$@"
}
dl megatron-core==0.19.2
du -sh "$WHL"; ls "$WHL"
