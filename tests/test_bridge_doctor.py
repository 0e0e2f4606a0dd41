"""The doctor passes on a correct setup and fails (non-zero exit) on a missed sync."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm  # the 3.12 lane has no vLLM

REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory):
    """Tied embeddings, and 512 positions: below the doctor's default context cap of 1024."""
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("doctor") / "llama_tied_pos512",
                               TinyModelSpec(arch="llama", tie_word_embeddings=True, max_position_embeddings=512)))


def _doctor(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "megatron_grpo.bridge.doctor", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr


def test_doctor_passes_at_tp2_rollout_tp2_with_temperature_and_the_models_context_length(llama_tied):
    """Also: a model with 512 positions passes without --max-model-len (the context is min(1024, 512);
    vLLM refuses 1024 for it: test_doctor_reports_vllms_refusal_in_full_on_one_line)."""
    rc, out = _doctor("--model", llama_tied, "--tp", "2", "--rollout-tp", "2", "--temperature", "0.7")
    assert rc == 0, out[-4000:]
    assert "doctor: PASS" in out and "temperature 0.7" in out
    for key in ("megatron_vs_vllm", "megatron_vs_hf", "vllm_vs_hf"):
        line = next(l for l in out.splitlines() if l.startswith(key))
        assert line.endswith("[OK]"), line


def test_doctor_fails_when_the_sync_is_skipped(llama_tied):
    rc, out = _doctor("--model", llama_tied, "--perturb", "3", "--skip-sync")
    assert rc == 1, out[-4000:]
    assert "doctor: FAIL" in out and "weight sync: SKIPPED" in out


def test_doctor_reports_vllms_refusal_in_full_on_one_line(llama_tied):
    rc, out = _doctor("--model", llama_tied, "--max-model-len", "1024", "--no-hf")
    assert rc == 2, out[-4000:]
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, out[-4000:]
    # the reason, not only pydantic's "1 validation error for ModelConfig" header
    assert "vLLM refused" in errors[0] and "1024" in errors[0] and "512" in errors[0], errors[0]
    assert "Traceback" not in out
