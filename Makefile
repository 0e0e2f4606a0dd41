# The two commands at the top of the README. Each sets up .venv first (idempotent, fast when done).
PY := .venv/bin/python
.PHONY: setup demo test test-fast clean-runs

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) -m megatron_grpo.demo

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

clean-runs:
	rm -rf runs
