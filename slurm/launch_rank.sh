#!/usr/bin/env bash
# One rank, run by srun once per task (per GPU): torch.distributed's env:// variables from Slurm's
# per-task ones, then exec the command (so signals from srun reach the Python process directly).
# MASTER_ADDR / MASTER_PORT come from the batch script through the environment.
set -euo pipefail
export RANK=${SLURM_PROCID:?launch_rank.sh runs under srun}
export LOCAL_RANK=${SLURM_LOCALID:?}
export WORLD_SIZE=${SLURM_NTASKS:?}
export NODE_RANK=${SLURM_NODEID:?}
export GROUP_RANK=$NODE_RANK
export LOCAL_WORLD_SIZE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
: "${MASTER_ADDR:?set by the batch script}" "${MASTER_PORT:?set by the batch script}"
if [[ ${GRPO_RANK_INFO:-0} == 1 ]]; then  # one line per rank: where each rank really runs (placement debugging, CI)
    echo "[grpo-rank] rank $RANK/$WORLD_SIZE local $LOCAL_RANK node $NODE_RANK on $(hostname)" \
        "(SLURMD_NODENAME=${SLURMD_NODENAME:-} restart ${SLURM_RESTART_COUNT:-0}" \
        "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} pid $$)" >&2
fi
exec "$@"
