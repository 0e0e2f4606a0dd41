#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submit a GRPO job with every knob taken from the environment (#SBATCH lines cannot read it).
#
#   NODES=2 GPUS_PER_NODE=8 PARTITION=batch ACCOUNT=proj CONTAINER_IMAGE=/shared/megatron-grpo.sqsh \
#       slurm/submit.sh [--dry-run] [--script slurm/grpo_disaggregated.sh] [sbatch flags ...] [-- overrides ...]
#
# Before submitting it checks the launch plan on this node (slurm/plan.py: the config loads, world size
# = NODES x GPUS_PER_NODE divides by TP x PP, the batch splits over DP), so a bad split fails in a second
# instead of after the queue wait; PLAN_CHECK=0 skips that (e.g. no Python env on the login node).
# --dry-run prints the sbatch line, the srun line(s) and every rank's node / local rank / TP, PP, DP.
# Everything after `--` is passed to the trainer as key=value overrides; other arguments go to sbatch.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${REPO_DIR:-$(cd "$here/.." && pwd)}
export REPO_DIR
# shellcheck source=common.sh
source "$REPO_DIR/slurm/common.sh"

usage() { sed -n '3,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

script=$REPO_DIR/slurm/grpo_8node.sh
dry=0
extra=()
overrides=()
while (($#)); do
    case $1 in
        --dry-run) dry=1 ;;
        --script) script=$2; shift ;;
        --script=*) script=${1#--script=} ;;
        -h | --help) usage; exit 0 ;;
        --nodes=*) NODES=${1#--nodes=} ;;                 # same as NODES=..., kept in one place
        --gpus-per-node=*) GPUS_PER_NODE=${1#--gpus-per-node=} ;;
        --) shift; overrides=("$@"); break ;;
        *) extra+=("$1") ;;
    esac
    shift
done
[[ $script == /* ]] || script=$PWD/$script
if [[ ! -f $script ]]; then
    echo "error: no batch script $script" >&2
    exit 2
fi

# The job runs in the checkout (REPO_DIR): a relative CONFIG that exists from here is made absolute, a
# relative OUTPUT_DIR is taken relative to here as well.
if [[ -n ${CONFIG:-} && $CONFIG != /* && -f $PWD/$CONFIG && $PWD != "$REPO_DIR" ]]; then CONFIG=$PWD/$CONFIG; fi
if [[ -n ${OUTPUT_DIR:-} && $OUTPUT_DIR != /* ]]; then OUTPUT_DIR=$PWD/$OUTPUT_DIR; fi

# The job's shape comes from the environment here, never from an allocation we may be running in.
: "${NODES:=8}" "${GPUS_PER_NODE:=8}"
export NODES GPUS_PER_NODE
[[ $(basename "$script") == grpo_disaggregated.sh ]] && : "${JOB_NAME:=grpo-disagg}"
grpo_defaults
export CONFIG OVERRIDES OUTPUT_DIR TRAIN_CMD PYTHON
grpo_sbatch_flags
[[ -n ${LOG_DIR:-} ]] && mkdir -p "$LOG_DIR"
sbatch_line=(sbatch "${GRPO_SBATCH_FLAGS[@]}" "${extra[@]}" "$script" "${overrides[@]}")

if [[ ${PLAN_CHECK:-1} != 0 && $dry == 0 ]]; then
    rollout=0 plan_overrides=()
    if [[ $(basename "$script") == grpo_disaggregated.sh ]]; then
        rollout=$(grpo_rollout_nodes) || exit 2
        plan_overrides=(rollout.placement=disaggregated)
    fi
    read -r -a user <<<"$OVERRIDES"
    [[ -n $OUTPUT_DIR ]] && plan_overrides+=("trainer.output_dir=$OUTPUT_DIR")
    plan_rc=0
    (cd "$REPO_DIR" && "$PLAN_PYTHON" "$REPO_DIR/slurm/plan.py" --check --config "$CONFIG" --nodes "$NODES" \
        --gpus-per-node "$GPUS_PER_NODE" --rollout-nodes "$rollout" "${plan_overrides[@]}" "${user[@]}" \
        "${overrides[@]}") >&2 || plan_rc=$?  # stdout stays sbatch's (--parsable)
    if ((plan_rc == 3)); then
        grpo_log "warning: launch plan not checked ($PLAN_PYTHON cannot load the config; set PLAN_PYTHON)"
    elif ((plan_rc != 0)); then
        echo "error: launch plan check failed (PLAN_CHECK=0 skips it); nothing submitted" >&2
        exit 2
    fi
fi

if ((dry)); then
    GRPO_SBATCH_LINE=$(grpo_quote "${sbatch_line[@]}") DRY_RUN=1 SLURM_JOB_ID="" bash "$script" "${overrides[@]}"
    exit $?
fi
grpo_log "$(grpo_quote "${sbatch_line[@]}")"
exec "${sbatch_line[@]}"
