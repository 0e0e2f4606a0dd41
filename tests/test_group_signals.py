"""Signals to the whole process group -- what Slurm's scancel/preemption, `timeout` and Ctrl-C do --
end a real `megatron-grpo train` with a checkpoint of the current step and exit 0; every helper the
trainer started (reward workers, dist_checkpointing's helper, torchrun's ranks) survives until the
save is done, and the resumed run continues exactly."""
import os
import signal

import pytest

from megatron_grpo.trainer.checkpoint import verify_checkpoint
from tests.e2e import finish_run, metrics, run_train, saved_step, start_run, wait_for_run

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("no_shm_leak")]

COMMON = ["trainer.eval_steps=0", "trainer.export_at_end=false", "trainer.samples_every=0"]


@pytest.mark.timeout(3000)
def test_group_sigterm_during_a_save_then_exact_resume(assets, plain_run, tmp_path):
    """SIGTERM to the group while step 2's checkpoint is being written: the save completes, the run
    stops after the next step with its checkpoint, exit 0; the resumed step 4 equals an uninterrupted run's
    (the session's `plain_run`: these settings, checkpoint.keep_last=5, which only keeps more checkpoints).
    (It used to end in "Broken pipe": dist_checkpointing's results-queue manager died of the SIGTERM,
    started after multiprocessing's resource tracker had unblocked it; see PreemptionFlag.children_immune.)"""
    args = [*assets, *COMMON, "trainer.max_steps=4", "checkpoint.save_steps=1"]
    run_dir = tmp_path / "run"
    proc = start_run([*args, f"trainer.output_dir={run_dir}"], tmp_path / "run.log")
    partial = run_dir / "checkpoints" / "step_00000002.partial"
    wait_for_run(proc, partial.exists, "step 2's save")
    os.killpg(proc.pid, signal.SIGTERM)
    log = finish_run(proc)
    assert proc.returncode == 0, log[-3000:]
    step = saved_step(log, signal.SIGTERM)
    assert step == 3, log[-3000:]
    for s in (2, 3):
        assert verify_checkpoint(run_dir / "checkpoints" / f"step_{s:08d}") is None
    assert "Traceback" not in log and "Connection refused" not in log, log[-3000:]

    resumed = run_train(*args, f"trainer.output_dir={run_dir}", timeout=900)
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got, want = {r["step"]: r for r in metrics(run_dir)}, plain_run["metrics"]
    assert sorted(want) == [1, 2, 3, 4]
    assert sorted(got) == [1, 2, 3, 4]
    for key in ("reward/mean", "train/loss", "train/grad_norm", "completion/length_mean"):
        assert got[4][key] == want[4][key], (key, got[4][key], want[4][key])


@pytest.mark.timeout(1800)
def test_group_sigint_during_a_step_under_nproc_per_node(assets, tmp_path):
    """`train --nproc-per-node 2` (torchrun underneath) and Ctrl-C (SIGINT to the foreground group): the
    launcher takes it instead of torchrun (whose own SIGINT handling would kill the ranks and end in a
    traceback) and hands it to the ranks; they finish the step, checkpoint it and exit 0. The same path with
    SIGTERM (`timeout`, a batch system) is test_trainer_bf16's run (launch.FORWARDED holds both).
    The run has a TMPDIR of its own and leaves nothing there but torch's compile cache (torchrun's
    default log folder, ``torchelastic_*``, used to stay behind: one per run)."""
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    proc = start_run([*assets, *COMMON, "parallel.tp=2", "trainer.max_steps=40", "checkpoint.save_steps=0",
                      f"trainer.output_dir={run_dir}"], tmp_path / "run.log", nproc=2, TMPDIR=str(tmp))
    wait_for_run(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 1, "step 1")
    os.killpg(proc.pid, signal.SIGINT)
    log = finish_run(proc)
    assert proc.returncode == 0, log[-3000:]
    step = saved_step(log, signal.SIGINT)
    assert 1 <= step < 40
    assert verify_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}") is None
    assert "Traceback" not in log and "SignalException" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"left behind in TMPDIR: {left}"
