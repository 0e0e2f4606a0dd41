"""Signals to the whole process group -- what Slurm's scancel/preemption, `timeout` and Ctrl-C do --
end a real `megatron-grpo train` with a checkpoint of the current step and exit 0; every helper the
trainer started (reward workers, dist_checkpointing's helper, torchrun's ranks) survives until the
save is done, and the resumed run continues exactly."""
import os
import re
import signal
import subprocess
import time

import pytest

from megatron_grpo.trainer.checkpoint import verify_checkpoint
from tests.e2e import REPO, env, kill_tree, metrics, run_train, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("no_shm_leak")]

COMMON = ["trainer.eval_steps=0", "trainer.export_at_end=false", "trainer.samples_every=0"]


def _start(args, log_path, nproc=1):
    # start_new_session: the run is its own process group, as a job step or a shell's foreground job is
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads while waiting (it would block the run)
        proc = subprocess.Popen(train_cmd(*args, nproc=nproc), cwd=REPO, env=env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    return proc


def _finish(proc, timeout=900) -> str:
    proc.wait(timeout=timeout)
    return proc.log_path.read_text()


def _wait_for(proc, ready, what, timeout=1500):
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what}:\n{proc.log_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)


def _saved_step(log: str, signum: int) -> int:
    found = re.search(rf"preemption signal {signum}: checkpoint of step (\d+) saved", log)
    assert found, log[-3000:]
    return int(found.group(1))


@pytest.mark.timeout(3000)
def test_group_sigterm_during_a_save_then_exact_resume(assets, plain_run, tmp_path):
    """SIGTERM to the group while step 2's checkpoint is being written: the save completes, the run
    stops after the next step with its checkpoint, exit 0; the resumed step 4 equals an uninterrupted run's
    (the session's `plain_run`: these settings, checkpoint.keep_last=5, which only keeps more checkpoints).
    (It used to end in "Broken pipe": dist_checkpointing's results-queue manager died of the SIGTERM,
    started after multiprocessing's resource tracker had unblocked it; see PreemptionFlag.children_immune.)"""
    args = [*assets, *COMMON, "trainer.max_steps=4", "checkpoint.save_steps=1"]
    run_dir = tmp_path / "run"
    proc = _start([*args, f"trainer.output_dir={run_dir}"], tmp_path / "run.log")
    partial = run_dir / "checkpoints" / "step_00000002.partial"
    _wait_for(proc, partial.exists, "step 2's save")
    os.killpg(proc.pid, signal.SIGTERM)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    step = _saved_step(log, signal.SIGTERM)
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
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_group_signal_during_a_step_under_nproc_per_node(assets, tmp_path, signum):
    """`train --nproc-per-node 2` (torchrun underneath): the group signal reaches the launcher, which
    hands it to the ranks; they finish the step, checkpoint it and exit 0 (torchrun sees clean exits)."""
    run_dir = tmp_path / "run"
    proc = _start([*assets, *COMMON, "parallel.tp=2", "trainer.max_steps=40", "checkpoint.save_steps=0",
                   f"trainer.output_dir={run_dir}"], tmp_path / "run.log", nproc=2)
    _wait_for(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 1, "step 1")
    os.killpg(proc.pid, signum)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    step = _saved_step(log, signum)
    assert 1 <= step < 40
    assert verify_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}") is None
    assert "Traceback" not in log and "SignalException" not in log, log[-3000:]
