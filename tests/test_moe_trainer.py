"""The real trainer on a Mixture-of-Experts policy: `configs/grpo_tiny_moe_cpu.yaml` at EP=2.

vLLM rollouts of a tiny Qwen3-MoE (4 experts, top-2), the megatron-core MoE policy with its experts split
over 2 EP ranks, the bridge streaming the experts back into vLLM's fused-MoE layout, R2 routing replay
over 2 mini-batches per step. One uninterrupted run and one killed with SIGKILL and resumed; the resumed
steps must equal the uninterrupted run's bit for bit.
"""
import os
import random

import pytest

from tests.e2e import REPO, kill9_at_step, metrics, prepare_tiny_assets, run_train, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("no_shm_leak")]

MOE_CONFIG = REPO / "configs" / "grpo_tiny_moe_cpu.yaml"
STEPS = 6
COMPARED = ("reward/mean", "reward/format/mean", "train/loss", "train/grad_norm", "train/clip_frac_low",
            "train/clip_frac_high", "completion/length_mean", "train/rollout_logprob_abs_diff",
            "train/moe/load_balancing_loss", "train/moe/routing_changed_frac")


@pytest.fixture(scope="module")
def moe_assets(tmp_path_factory):
    """The MoE config's own tiny warm-started Qwen3-MoE and its data, made once by the trainer's asset step."""
    return prepare_tiny_assets(tmp_path_factory.mktemp("moe_assets"), MOE_CONFIG)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout tail:\n{proc.stdout[-4000:]}\nstderr tail:\n{proc.stderr[-4000:]}"


def _parity(stdout: str) -> float:
    line = next(l for l in stdout.splitlines() if "step-1 logprob parity" in l)
    return float(line.rsplit(":", 1)[1])


def test_moe_ep2_r2_trains_and_resumes_after_kill9_bit_exact(moe_assets, tmp_path):
    common = [*moe_assets, f"trainer.max_steps={STEPS}", "checkpoint.save_steps=2", f"trainer.eval_steps={STEPS}",
              "trainer.eval_max_prompts=8"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run_train(*common, f"trainer.output_dir={ref_dir}", nproc=2, config=MOE_CONFIG)
    _ok(ref)
    assert "layout tp=1 pp=1 dp=2" in ref.stdout
    assert _parity(ref.stdout) <= 1e-3  # Megatron MoE (EP=2) vs vLLM fused-MoE on the sampled tokens
    rows = metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["train/skipped"] == 0.0, r
        assert r["train/moe/routing_changed_frac"] == 0.0, r  # R2: the second mini-batch replays the old pass
        assert r["train/moe/load_balancing_loss"] > 0, r
        # after each optimizer step the bridge reloads the experts into vLLM: rollout and trainer still agree
        assert r["train/rollout_logprob_abs_diff"] <= 1e-3, r
    assert "eval/accuracy" in rows[-1]
    assert (ref_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert (ref_dir / "export_hf" / "model.safetensors").is_file()
    reference = {r["step"]: r for r in rows}

    kill_at = random.Random(os.environ.get("PYTEST_SEED", "0")).choice([3, 4])
    resumed_from = kill9_at_step(train_cmd(*common, f"trainer.output_dir={run_dir}", nproc=2, config=MOE_CONFIG),
                                 run_dir, kill_at)
    assert resumed_from < STEPS, "the run finished before it was killed"

    resumed = run_train(*common, f"trainer.output_dir={run_dir}", "checkpoint.resume=auto", nproc=2, config=MOE_CONFIG)
    _ok(resumed)
    assert f"at step {resumed_from}" in resumed.stdout, resumed.stdout[-2000:]
    got = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        for key in COMPARED:
            assert got[step][key] == reference[step][key], (step, key, got[step][key], reference[step][key])
