#!/usr/bin/env bash
# Install vLLM + megatron-core + megatron-grpo into an NGC PyTorch container, without ever replacing the
# container's torch / TransformerEngine / apex / NCCL builds. Used by slurm/Dockerfile, and directly on a
# cluster without Docker through pyxis (see slurm/README.md, "Build without Docker"):
#
#   srun -N1 --container-image=nvcr.io#nvidia/pytorch:25.06-py3 --container-mounts="$PWD:/src" \
#        --container-save=/shared/containers/megatron-grpo.sqsh bash /src/slurm/container_setup.sh /src
#
# Knobs (environment): VLLM_REF (git tag, default v0.11.0), VLLM_INSTALL=source|wheel|none,
# TORCH_CUDA_ARCH_LIST (default 9.0 = H100; "8.0;9.0" adds A100), MAX_JOBS (parallel nvcc jobs).
set -euo pipefail

SRC=${1:-/opt/megatron-grpo}
: "${VLLM_REF:=v0.11.0}" "${VLLM_INSTALL:=source}" "${TORCH_CUDA_ARCH_LIST:=9.0}" "${MAX_JOBS:=16}"
export TORCH_CUDA_ARCH_LIST MAX_JOBS PIP_NO_CACHE_DIR=1

# 1. Freeze what the base image brings. Every later pip call runs with these constraints, so a package
#    that wants a PyPI torch (vLLM wheels pin an exact upstream torch) fails the build loudly instead of
#    silently swapping NVIDIA's torch (and with it TE/apex ABI compatibility) for a PyPI one.
CONSTRAINTS=/opt/base-constraints.txt
python -m pip list --format=freeze |
    grep -iE '^(torch|torchvision|torchaudio|transformer[-_]engine[-_a-z]*|apex|flash[-_]attn|triton|pytorch[-_]triton|nvidia[-_][a-z0-9_-]+|numpy)==' \
        >"$CONSTRAINTS" || true
echo "== frozen from the base image:"
cat "$CONSTRAINTS"
TORCH_BEFORE=$(python -c 'import torch; print(torch.__version__)')

# 2. vLLM
case $VLLM_INSTALL in
    source)  # build against the container's torch (vLLM's documented "use an existing PyTorch" path)
        rm -rf /opt/vllm
        git clone --depth 1 --branch "$VLLM_REF" https://github.com/vllm-project/vllm.git /opt/vllm
        (
            cd /opt/vllm
            python use_existing_torch.py
            for req in requirements/build/cuda.txt requirements/build.txt requirements-build.txt; do
                if [[ -f $req ]]; then python -m pip install -c "$CONSTRAINTS" -r "$req"; break; fi
            done
            python -m pip install -c "$CONSTRAINTS" --no-build-isolation .
        )
        rm -rf /opt/vllm
        ;;
    wheel)  # only when the vLLM release pins exactly the container's torch version
        python -m pip install -c "$CONSTRAINTS" "vllm==${VLLM_REF#v}"
        ;;
    none) ;;
    *) echo "error: VLLM_INSTALL=$VLLM_INSTALL (source, wheel or none)" >&2; exit 2 ;;
esac

# 3. megatron-core and this package (its core requirements; TE comes from the base image, vLLM from step 2)
python -m pip install -c "$CONSTRAINTS" "$SRC" tensorboard

# 4. Guard: the container's torch is still the one it shipped with.
TORCH_AFTER=$(python -c 'import torch; print(torch.__version__)')
if [[ $TORCH_AFTER != "$TORCH_BEFORE" ]]; then
    echo "error: torch changed from $TORCH_BEFORE to $TORCH_AFTER during the install" >&2
    exit 1
fi
python -c 'import vllm, megatron.core, megatron_grpo; print("vllm", vllm.__version__, "| megatron-core", megatron.core.__version__)' ||
    [[ $VLLM_INSTALL == none ]]
echo "== megatron-grpo container ready (torch $TORCH_AFTER)"
