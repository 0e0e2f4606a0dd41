# shellcheck shell=bash
# shellcheck disable=SC2034  # the GRPO_* arrays set here are outputs, read by the scripts that source this
# Shared by slurm/grpo_8node.sh, slurm/grpo_disaggregated.sh and slurm/submit.sh (sourced, not run).
#
# Everything here is configured through environment variables (see slurm/README.md for the table);
# each has a default that fits an 8-node x 8-GPU H100 job. Functions are prefixed grpo_.

grpo_log() { printf '[grpo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- knobs ----------------------------------------------------------------------------------------
grpo_defaults() {  # NODES / GPUS_PER_NODE: grpo_allocation_shape
    : "${JOB_NAME:=grpo}"
    : "${TIME_LIMIT:=04:00:00}"
    : "${SIGNAL_LEAD_S:=300}"   # USR1 this many seconds before the time limit (one step + one save)
    : "${EXCLUSIVE:=1}"
    : "${CONFIG:=configs/grpo_qwen2.5_7b_8node.yaml}"
    : "${OVERRIDES:=}"
    : "${OUTPUT_DIR:=}"          # empty: the config's trainer.output_dir
    : "${REQUEUE_ON_USR1:=1}"    # after a USR1-triggered checkpoint, `scontrol requeue` this job
    : "${MAX_RESTARTS:=50}"      # stop requeueing after this many restarts (a crash-looping job)
    : "${CONTAINER_IMAGE:=}"     # pyxis image: registry#image:tag or /path/image.sqsh; empty: no container
    : "${CONTAINER_MOUNTS:=}"    # empty: the checkout (and OUTPUT_DIR) at the same paths
    : "${CONTAINER_EXTRA_FLAGS:=}"
    : "${SRUN_EXTRA_FLAGS:=}"
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -z $CONTAINER_IMAGE && -x $REPO_DIR/.venv/bin/python ]]; then
            PYTHON=$REPO_DIR/.venv/bin/python
        elif [[ -z $CONTAINER_IMAGE ]] && ! command -v python >/dev/null 2>&1; then
            PYTHON=python3
        else
            PYTHON=python
        fi
    fi
    # Python on the submit host for the launch plan (slurm/plan.py): needs this package's config deps.
    if [[ -z ${PLAN_PYTHON:-} ]]; then
        if [[ -x $REPO_DIR/.venv/bin/python ]]; then PLAN_PYTHON=$REPO_DIR/.venv/bin/python; else PLAN_PYTHON=python3; fi
    fi
    # The command every rank runs; the config and overrides are appended. Tests swap in a payload.
    : "${TRAIN_CMD:=$PYTHON -m megatron_grpo.cli train}"
    export PYTHON TRAIN_CMD
}

# NODES / GPUS_PER_NODE: inside an allocation from Slurm (what was granted, not what the env asked
# for); outside one (dry run, submit.sh) from the environment, default 8 x 8.
grpo_allocation_shape() {
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        if [[ -n ${NODES:-} && $NODES != "$SLURM_JOB_NUM_NODES" ]]; then
            grpo_log "warning: NODES=$NODES but the allocation has $SLURM_JOB_NUM_NODES nodes (#SBATCH lines do" \
                "not read the environment: use slurm/submit.sh or sbatch --nodes=$NODES); using $SLURM_JOB_NUM_NODES"
        fi
        NODES=$SLURM_JOB_NUM_NODES
        local granted=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
        granted=${granted##*:}   # "h100:8" -> 8
        if [[ -z ${GPUS_PER_NODE:-} ]]; then
            GPUS_PER_NODE=${granted:-8}
        elif [[ -n $granted && $granted != "$GPUS_PER_NODE" ]]; then
            grpo_log "warning: GPUS_PER_NODE=$GPUS_PER_NODE but $granted GPUs per node were allocated;" \
                "starting $GPUS_PER_NODE ranks per node"
        fi
        mapfile -t GRPO_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else
        : "${NODES:=8}" "${GPUS_PER_NODE:=8}"
        GRPO_HOSTS=()
        local i
        for ((i = 0; i < NODES; i++)); do GRPO_HOSTS+=("node$i"); done
    fi
    export NODES GPUS_PER_NODE
}

# Disaggregated placement: the first ROLLOUT_NODES nodes run vLLM, the others train (default: half).
grpo_rollout_nodes() {
    local r=${ROLLOUT_NODES:-$((NODES / 2))}
    if ((r < 1 || r >= NODES)); then
        echo "error: ROLLOUT_NODES=$r must be in [1, $((NODES - 1))] for $NODES nodes" >&2
        return 1
    fi
    echo "$r"
}

# MASTER_PORT etc. from the job id: stable across requeues, distinct for jobs that share a node.
grpo_port_base() { echo $((10000 + (${SLURM_JOB_ID:-0} % 6000) * 3)); }

# ---- NCCL / torch.distributed environment -----------------------------------------------------------
grpo_dist_env() {
    # Only defaults: anything already set in the submitting shell wins.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                 # INFO while debugging a hang or a slow start
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # timeout -> abort, not hang
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP/SP comm overlap ordering
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}          # as torchrun; raise for CPU-heavy data loading
    export PYTHONUNBUFFERED=1
    # Interface/HCA selection is cluster-specific; pass them through when set, e.g.
    #   NCCL_SOCKET_IFNAME=ib0 (or ^lo,docker)  GLOO_SOCKET_IFNAME=ib0  NCCL_IB_HCA=mlx5_0,mlx5_1
    # NCCL_TIMEOUT_S -> the trainer's collective timeout (parallel.timeout_s), see grpo_train_args.
    if [[ ${NCCL_FLIGHT_RECORDER:-0} == 1 ]]; then  # per-rank trace dumps of the last collectives on timeout
        export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
        export TORCH_NCCL_DUMP_ON_TIMEOUT=1
        local d=${NCCL_TRACE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/nccl_trace_${SLURM_JOB_ID:-dry}}
        [[ -n ${SLURM_JOB_ID:-} ]] && mkdir -p "$d"
        export TORCH_FR_DUMP_TEMP_FILE=$d/rank_
    fi
}

# ---- sbatch flags (what submit.sh passes; the batch scripts' #SBATCH lines are the same defaults) ---
grpo_sbatch_flags() {
    GRPO_SBATCH_FLAGS=(
        --job-name="$JOB_NAME"
        --nodes="$NODES"
        --gpus-per-node="$GPUS_PER_NODE"
        --time="$TIME_LIMIT"
        --signal="B:USR1@$SIGNAL_LEAD_S"
        --requeue
        --open-mode=append
        --output="${LOG_DIR:-.}/%x-%j.out"
    )
    [[ $EXCLUSIVE == 1 ]] && GRPO_SBATCH_FLAGS+=(--exclusive --mem=0)
    [[ -n ${PARTITION:-} ]] && GRPO_SBATCH_FLAGS+=(--partition="$PARTITION")
    [[ -n ${ACCOUNT:-} ]] && GRPO_SBATCH_FLAGS+=(--account="$ACCOUNT")
    [[ -n ${QOS:-} ]] && GRPO_SBATCH_FLAGS+=(--qos="$QOS")
    [[ -n ${RESERVATION:-} ]] && GRPO_SBATCH_FLAGS+=(--reservation="$RESERVATION")
    return 0
}

# ---- the srun command -------------------------------------------------------------------------------
# grpo_srun_cmd NNODES HOSTLIST [SRUN_FLAG...] -> GRPO_SRUN (array): srun [+ pyxis flags] launch_rank.sh
grpo_srun_cmd() {
    local nnodes=$1 hostlist=$2
    shift 2
    local cpus=${CPUS_PER_TASK:-}
    if [[ -z $cpus && -z ${SLURM_CPUS_ON_NODE:-} ]]; then
        cpus="<cpus-on-node/$GPUS_PER_NODE>"  # dry run outside an allocation
    elif [[ -z $cpus ]]; then
        cpus=$((SLURM_CPUS_ON_NODE / GPUS_PER_NODE))
        ((cpus < 1)) && cpus=1
    fi
    GRPO_SRUN=(
        srun
        --nodes="$nnodes"
        --ntasks=$((nnodes * GPUS_PER_NODE))
        --ntasks-per-node="$GPUS_PER_NODE"
        --cpus-per-task="$cpus"
        --kill-on-bad-exit=1
        --label
    )
    [[ -n $hostlist ]] && GRPO_SRUN+=(--nodelist="$hostlist")
    GRPO_SRUN+=("$@")
    if [[ -n $CONTAINER_IMAGE ]]; then
        local mounts=$CONTAINER_MOUNTS
        if [[ -z $mounts ]]; then
            mounts=$REPO_DIR:$REPO_DIR
            [[ $OUTPUT_DIR == /* && $OUTPUT_DIR != "$REPO_DIR"/* ]] && mounts+=,$OUTPUT_DIR:$OUTPUT_DIR
        fi
        GRPO_SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="$REPO_DIR")
        local extra
        read -r -a extra <<<"$CONTAINER_EXTRA_FLAGS"
        GRPO_SRUN+=("${extra[@]}")
    fi
    local sextra
    read -r -a sextra <<<"$SRUN_EXTRA_FLAGS"
    GRPO_SRUN+=("${sextra[@]}" bash "$REPO_DIR/slurm/launch_rank.sh")
}

# GRPO_OVERRIDES (array): run-wide overrides, OVERRIDES, then "$@"; GRPO_TRAIN_ARGS: the full command.
grpo_train_args() {
    local cmd user
    read -r -a cmd <<<"$TRAIN_CMD"
    read -r -a user <<<"$OVERRIDES"
    GRPO_OVERRIDES=()
    [[ -n $OUTPUT_DIR ]] && GRPO_OVERRIDES+=("trainer.output_dir=$OUTPUT_DIR")
    GRPO_OVERRIDES+=("checkpoint.resume=${RESUME:-auto}")
    [[ -n ${NCCL_TIMEOUT_S:-} ]] && GRPO_OVERRIDES+=("parallel.timeout_s=$NCCL_TIMEOUT_S")
    GRPO_OVERRIDES+=("${GRPO_EXTRA_OVERRIDES[@]}" "${user[@]}" "$@")
    # A requeued run always continues from the newest complete checkpoint, whatever RESUME said.
    [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]] && GRPO_OVERRIDES+=("checkpoint.resume=auto")
    GRPO_TRAIN_ARGS=("${cmd[@]}" --config "$CONFIG" "${GRPO_OVERRIDES[@]}")
}
GRPO_EXTRA_OVERRIDES=()  # set by a script before grpo_train_args (e.g. rollout.placement=disaggregated)

# grpo_plan NNODES [ROLLOUT_NODES]: TP/PP/DP split and rank table from the config (slurm/plan.py)
grpo_plan() {
    local hosts
    hosts=$(IFS=,; echo "${GRPO_HOSTS[*]}")
    "$PLAN_PYTHON" "$REPO_DIR/slurm/plan.py" --config "$CONFIG" --nodes "$1" --gpus-per-node "$GPUS_PER_NODE" \
        --hosts "$hosts" --rollout-nodes "${2:-0}" "${@:3}" "${GRPO_OVERRIDES[@]}"
}

# Print a command line that can be pasted into a shell (quotes only what needs it).
grpo_quote() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_,.=:/+@%^-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
    done
    echo "${out[*]}"
}

# ---- signals, waiting, requeue --------------------------------------------------------------------
# The batch shell gets USR1 (sbatch --signal=B:USR1@N, or `scancel --batch --signal=USR1`): it forwards
# the signal to the job step(s) (srun relays it to every task), waits for the ranks to checkpoint and
# exit, then requeues the job. SIGTERM (scancel, preemption, time limit) is forwarded too, but never
# requeues: a cancelled job stays cancelled, and PreemptMode=REQUEUE requeues by itself.
GRPO_SIGNAL=""
GRPO_TRAPS=0
GRPO_STEP_PIDS=()

grpo_on_signal() {
    local sig=$1 pid
    GRPO_SIGNAL=$sig
    GRPO_TRAPS=$((GRPO_TRAPS + 1))
    grpo_log "batch shell got SIG$sig (restart ${SLURM_RESTART_COUNT:-0}); forwarding to steps: ${GRPO_STEP_PIDS[*]}"
    for pid in "${GRPO_STEP_PIDS[@]}"; do
        kill -s "$sig" "$pid" 2>/dev/null || true
    done
}

grpo_install_traps() {
    trap 'grpo_on_signal USR1' USR1
    trap 'grpo_on_signal TERM' TERM
}

# grpo_wait PID -> the step's exit status, however many trapped signals interrupt `wait`.
grpo_wait() {
    local pid=$1 rc before last=""
    while :; do
        before=$GRPO_TRAPS
        wait "$pid"
        rc=$?
        if ((rc > 128)) && [[ $GRPO_TRAPS != "$before" ]]; then
            last=$rc   # interrupted by a trap: wait again for the real status
            continue
        fi
        if ((rc == 127)) && [[ -n $last ]]; then rc=$last; fi
        return "$rc"
    done
}

# After the step(s) ended with status $1: requeue on a USR1 checkpoint, else exit with the status.
grpo_finish() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if [[ $GRPO_SIGNAL == USR1 ]]; then
        if ((rc != 0)); then
            grpo_log "steps exited with $rc after USR1 (no clean checkpoint exit): not requeueing"
        elif [[ $REQUEUE_ON_USR1 != 1 ]]; then
            grpo_log "checkpointed after USR1; REQUEUE_ON_USR1=$REQUEUE_ON_USR1: not requeueing"
        elif ((restarts >= MAX_RESTARTS)); then
            grpo_log "checkpointed after USR1; restart $restarts >= MAX_RESTARTS=$MAX_RESTARTS: not requeueing"
        else
            grpo_log "checkpointed after USR1: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            grpo_log "scontrol requeue failed (was the job submitted with --requeue? JobRequeue=0?)"
            exit 1
        fi
    fi
    grpo_log "done: exit status $rc"
    exit "$rc"
}
