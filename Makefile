# The two commands at the top of the README. Each sets up .venv first (idempotent, fast when done).
PY := .venv/bin/python
.PHONY: setup setup-mcore019 demo test test-fast clean-runs

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) -m megatron_grpo.demo

# Two lanes: Python 3.11 + megatron-core 0.16.1 (all tests), Python 3.12 + 0.19.2 (tests without vLLM/Slurm).
setup-mcore019:
	bash tools/setup_env_mcore019.sh

# tools/test_lanes.sh builds .venv-mcore019 itself (setup-mcore019's script) in lane 2's stream, beside lane 1.
test: setup
	bash tools/test_lanes.sh

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

clean-runs:
	rm -rf runs
