#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# GRPO with disaggregated rollouts: the first ROLLOUT_NODES nodes run vLLM, the other nodes train.
#
#   ROLLOUT_NODES=4 slurm/submit.sh --script slurm/grpo_disaggregated.sh [-- overrides]
#   sbatch --nodes=8 slurm/grpo_disaggregated.sh                        # ROLLOUT_NODES default: half
#   DRY_RUN=1 ROLLOUT_NODES=4 bash slurm/grpo_disaggregated.sh
#
# One allocation, split by node (not a heterogeneous job: hetjob components are fixed in #SBATCH
# lines and cannot follow ROLLOUT_NODES from the environment). Two concurrent job steps on disjoint
# node lists, each its own torch.distributed world (ranks from 0), both running the same command with
# rollout.placement=disaggregated; the role comes from the environment:
#   GRPO_ROLE                 train | rollout
#   RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT   of the rank's own world
#   GRPO_TRAIN_HOSTS GRPO_ROLLOUT_HOSTS                  comma-separated node names of each world
#   GRPO_TRAIN_WORLD_SIZE GRPO_ROLLOUT_WORLD_SIZE
#   GRPO_TRANSFER_ADDR GRPO_TRANSFER_PORT                where training rank 0 listens for the rollout
#                                                        servers (megatron_grpo/rollout/remote.py)
#   GRPO_TRANSFER_AUTHKEY                                a random secret per run: the servers' handshake
# With GRPO_ROLE=rollout, `megatron-grpo train` runs a rollout server (megatron_grpo/rollout/server.py):
# one vLLM replica per rollout.tp ranks (a TP group must lie within a node), connected to training
# rank 0, which splits each step's prompts over the replicas and pushes weights to them.
# The job lives as long as the training step. When it ends (finished, failed or checkpointed after
# USR1) the servers have been told to exit (or lost their trainer) and normally end on their own;
# the rollout step gets ROLLOUT_EXIT_GRACE_S for that, then SIGTERM. If the rollout step fails first,
# training is stopped (SIGTERM: it checkpoints) and the job fails. ROLLOUT_CMD overrides the
# rollout command (default: TRAIN_CMD).
#
#SBATCH --job-name=grpo-disagg
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -uo pipefail

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

: "${JOB_NAME:=grpo-disagg}"
grpo_allocation_shape
grpo_defaults
grpo_dist_env
ROLLOUT_NODES=$(grpo_rollout_nodes) || exit 2
TRAIN_NODES=$((NODES - ROLLOUT_NODES))
GRPO_EXTRA_OVERRIDES=(rollout.placement=disaggregated)
grpo_train_args "$@"
read -r -a _rollout_cmd <<<"${ROLLOUT_CMD:-$TRAIN_CMD}"
GRPO_ROLLOUT_ARGS=("${_rollout_cmd[@]}" --config "$CONFIG" "${GRPO_OVERRIDES[@]}")

ROLLOUT_HOSTS=("${GRPO_HOSTS[@]:0:ROLLOUT_NODES}")
TRAIN_HOSTS=("${GRPO_HOSTS[@]:ROLLOUT_NODES}")
GRPO_ROLLOUT_HOSTS=$(IFS=,; echo "${ROLLOUT_HOSTS[*]}")
GRPO_TRAIN_HOSTS=$(IFS=,; echo "${TRAIN_HOSTS[*]}")
GRPO_ROLLOUT_WORLD_SIZE=$((ROLLOUT_NODES * GPUS_PER_NODE))
GRPO_TRAIN_WORLD_SIZE=$((TRAIN_NODES * GPUS_PER_NODE))
if [[ -n ${SLURM_JOB_ID:-} ]]; then base=$(grpo_port_base); else base=PORT_BASE; fi
GRPO_TRANSFER_ADDR=${TRAIN_HOSTS[0]}
GRPO_TRANSFER_PORT=$([[ $base == PORT_BASE ]] && echo "PORT_BASE+2" || echo $((base + 2)))
export ROLLOUT_NODES TRAIN_NODES GRPO_ROLLOUT_HOSTS GRPO_TRAIN_HOSTS GRPO_ROLLOUT_WORLD_SIZE GRPO_TRAIN_WORLD_SIZE \
    GRPO_TRANSFER_ADDR GRPO_TRANSFER_PORT
if [[ -z ${GRPO_TRANSFER_AUTHKEY:-} && -r /dev/urandom ]]; then  # both steps inherit it (--export=ALL,...)
    GRPO_TRANSFER_AUTHKEY=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    export GRPO_TRANSFER_AUTHKEY
fi

_port() { if [[ $base == PORT_BASE ]]; then echo "PORT_BASE+$1"; else echo $((base + $1)); fi; }
grpo_srun_cmd "$ROLLOUT_NODES" "$GRPO_ROLLOUT_HOSTS" \
    --export="ALL,GRPO_ROLE=rollout,MASTER_ADDR=${ROLLOUT_HOSTS[0]},MASTER_PORT=$(_port 1)"
ROLLOUT_SRUN=("${GRPO_SRUN[@]}")
grpo_srun_cmd "$TRAIN_NODES" "$GRPO_TRAIN_HOSTS" \
    --export="ALL,GRPO_ROLE=train,MASTER_ADDR=${TRAIN_HOSTS[0]},MASTER_PORT=$(_port 0)"
TRAIN_SRUN=("${GRPO_SRUN[@]}")

if [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; then
    if [[ -n ${GRPO_SBATCH_LINE:-} ]]; then
        printf '# sbatch:\n%s\n' "$GRPO_SBATCH_LINE"
    elif [[ -z ${SLURM_JOB_ID:-} ]]; then
        grpo_sbatch_flags
        echo "# sbatch (as slurm/submit.sh would run it):"
        grpo_quote sbatch "${GRPO_SBATCH_FLAGS[@]}" "$REPO_DIR/slurm/grpo_disaggregated.sh" "$@"
    fi
    echo "# rollout step: $ROLLOUT_NODES nodes x $GPUS_PER_NODE GPUs ($GRPO_ROLLOUT_HOSTS)"
    grpo_quote "${ROLLOUT_SRUN[@]}" "${GRPO_ROLLOUT_ARGS[@]}"
    echo "# training step: $TRAIN_NODES nodes x $GPUS_PER_NODE GPUs ($GRPO_TRAIN_HOSTS);" \
        "weight transfer rendezvous $GRPO_TRANSFER_ADDR:$GRPO_TRANSFER_PORT"
    grpo_quote "${TRAIN_SRUN[@]}" "${GRPO_TRAIN_ARGS[@]}"
    echo "# plan (parallel.tp/pp from the config via megatron_grpo.config.load_config):"
    grpo_plan "$NODES" "$ROLLOUT_NODES"
    exit $?
fi

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: not inside a Slurm job: submit with sbatch or slurm/submit.sh (or preview with DRY_RUN=1)" >&2
    exit 2
fi

[[ -n $OUTPUT_DIR ]] && mkdir -p "$OUTPUT_DIR"
grpo_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: rollout on $GRPO_ROLLOUT_HOSTS, training on" \
    "$GRPO_TRAIN_HOSTS ($GPUS_PER_NODE GPUs per node); transfer $GRPO_TRANSFER_ADDR:$GRPO_TRANSFER_PORT"
grpo_log "rollout: $(grpo_quote "${ROLLOUT_SRUN[@]}" "${GRPO_ROLLOUT_ARGS[@]}")"
grpo_log "train:   $(grpo_quote "${TRAIN_SRUN[@]}" "${GRPO_TRAIN_ARGS[@]}")"

grpo_install_traps
"${ROLLOUT_SRUN[@]}" "${GRPO_ROLLOUT_ARGS[@]}" &
rollout_pid=$!
"${TRAIN_SRUN[@]}" "${GRPO_TRAIN_ARGS[@]}" &
train_pid=$!
GRPO_STEP_PIDS=("$train_pid" "$rollout_pid")

rollout_rc="" rollout_failed=0
while kill -0 "$train_pid" 2>/dev/null; do
    if [[ -z $rollout_rc ]] && ! kill -0 "$rollout_pid" 2>/dev/null; then
        grpo_wait "$rollout_pid"
        rollout_rc=$?
        if ((rollout_rc != 0)) && [[ -z $GRPO_SIGNAL ]]; then
            rollout_failed=1
            grpo_log "rollout step failed (exit $rollout_rc): stopping training (SIGTERM: it checkpoints)"
            kill -s TERM "$train_pid" 2>/dev/null || true
        fi
    fi
    sleep 1 &
    wait $! 2>/dev/null   # a trapped signal interrupts this wait at once
done
grpo_wait "$train_pid"
rc=$?
if [[ -z $rollout_rc ]]; then  # the expected order: training is over, the rollout servers go
    for ((i = 0; i < ${ROLLOUT_EXIT_GRACE_S:-30}; i++)); do  # they exit by themselves once the trainer is gone
        kill -0 "$rollout_pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$rollout_pid" 2>/dev/null; then
        grpo_log "training step ended (exit $rc): stopping the rollout step"
    fi
    kill -s TERM "$rollout_pid" 2>/dev/null || true
    for ((i = 0; i < ${ROLLOUT_STOP_TIMEOUT_S:-60}; i++)); do
        kill -0 "$rollout_pid" 2>/dev/null || break
        sleep 1
    done
    kill -s KILL "$rollout_pid" 2>/dev/null || true
    grpo_wait "$rollout_pid"
    rollout_rc=$?
fi
grpo_log "rollout step exit $rollout_rc"
if ((rollout_failed && rc == 0)); then
    rc=$rollout_rc  # training checkpointed cleanly, but the job failed
fi
grpo_finish "$rc"
