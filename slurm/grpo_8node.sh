#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# GRPO on 8 nodes x 8 GPUs (64 ranks, one task per GPU), colocated vLLM rollouts.
#
#   sbatch slurm/grpo_8node.sh [key=value trainer overrides ...]
#   sbatch --nodes=2 --gpus-per-node=4 slurm/grpo_8node.sh           # command-line flags beat #SBATCH
#   NODES=2 GPUS_PER_NODE=4 slurm/submit.sh [-- overrides]            # env -> sbatch flags
#   DRY_RUN=1 bash slurm/grpo_8node.sh                                # print the plan, submit nothing
#
# Environment (all optional): CONFIG, OVERRIDES, OUTPUT_DIR, RESUME, CONTAINER_IMAGE, CONTAINER_MOUNTS,
# TRAIN_CMD, PYTHON, NCCL_*, NCCL_TIMEOUT_S, REQUEUE_ON_USR1, MAX_RESTARTS ... see slurm/README.md.
# #SBATCH lines cannot read the environment: they are the 8-node defaults; slurm/submit.sh turns
# NODES / GPUS_PER_NODE / PARTITION / ACCOUNT / TIME_LIMIT ... into flags that override them.
#
#SBATCH --job-name=grpo
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# Why B:USR1: the *batch shell* must know the job is about to end, so that after the ranks checkpoint
# it can `scontrol requeue` the job; it forwards USR1 to srun, which relays it to every rank. (A plain
# --signal=USR1 reaches only the ranks, and the shell could not tell "preempted" from "finished".)
# 300 s covers one GRPO step (~90 s for 8B models at this scale) plus a sharded checkpoint save.
#
# One task per GPU (not one torchrun per node): Slurm is already the process manager, every rank gets
# RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (slurm/launch_rank.sh), a
# dead rank kills the step (--kill-on-bad-exit), signals reach every rank directly through srun, and
# pyxis starts each task in the container with no extra launcher inside it. Each rank sees all GPUs of
# its node and picks cuda:LOCAL_RANK (NCCL P2P/NVLS and CUDA IPC for weight sync need the peers visible).

set -uo pipefail

# sbatch runs a copy of this script from the slurmd spool dir: find the checkout through REPO_DIR
# (exported by submit.sh) or the submit directory; run directly, through the script's own path.
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${REPO_DIR:-} ]]; then
    if [[ -f $_here/common.sh ]]; then REPO_DIR=$(cd "$_here/.." && pwd); else REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}; fi
fi
if [[ ! -f $REPO_DIR/slurm/common.sh ]]; then
    echo "error: $REPO_DIR is not the megatron-grpo checkout: set REPO_DIR or submit from its root" >&2
    exit 1
fi
export REPO_DIR
# shellcheck source=common.sh
source "$REPO_DIR/slurm/common.sh"
cd "$REPO_DIR" || exit 1

grpo_allocation_shape
grpo_defaults
grpo_dist_env
grpo_train_args "$@"

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    MASTER_ADDR=${GRPO_HOSTS[0]}
    MASTER_PORT=$(grpo_port_base)
else  # dry run outside an allocation
    MASTER_ADDR="<first node>" MASTER_PORT="<10000 + (job id % 6000) * 3>"
fi
export MASTER_ADDR MASTER_PORT
grpo_srun_cmd "$NODES" ""

if [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; then
    if [[ -n ${GRPO_SBATCH_LINE:-} ]]; then
        printf '# sbatch:\n%s\n' "$GRPO_SBATCH_LINE"
    elif [[ -z ${SLURM_JOB_ID:-} ]]; then
        grpo_sbatch_flags
        echo "# sbatch (as slurm/submit.sh would run it):"
        grpo_quote sbatch "${GRPO_SBATCH_FLAGS[@]}" "$REPO_DIR/slurm/grpo_8node.sh" "$@"
    fi
    echo "# each of the ${NODES}x${GPUS_PER_NODE} ranks (MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT):"
    grpo_quote "${GRPO_SRUN[@]}" "${GRPO_TRAIN_ARGS[@]}"
    echo "# plan (parallel.tp/pp from the config via megatron_grpo.config.load_config):"
    grpo_plan "$NODES"
    exit $?
fi

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: not inside a Slurm job: submit with 'sbatch slurm/grpo_8node.sh' or 'slurm/submit.sh'" \
        "(or preview with DRY_RUN=1)" >&2
    exit 2
fi

[[ -n $OUTPUT_DIR ]] && mkdir -p "$OUTPUT_DIR"
grpo_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $NODES nodes x $GPUS_PER_NODE GPUs on" \
    "${GRPO_HOSTS[*]}; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
grpo_log "$(grpo_quote "${GRPO_SRUN[@]}" "${GRPO_TRAIN_ARGS[@]}")"

grpo_install_traps
"${GRPO_SRUN[@]}" "${GRPO_TRAIN_ARGS[@]}" &
GRPO_STEP_PIDS=($!)
grpo_wait "${GRPO_STEP_PIDS[0]}"
grpo_finish $?
