"""One-step off-policy generation (``rollout.async_steps=1``, ``rollout/prefetch.py``) through the CLI:
it learns, never trains on a sample more than one weight version old, resumes bit-exactly after
kill -9, and the colocated schedule gives the disaggregated (overlapping) run's results exactly.
(Bad settings: tests/test_bad_input_corpus.py.)"""
import os
import random

import pytest

from tests.e2e import kill9_at_step, metrics, run_train, shm_left_after, shm_names, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("no_shm_leak")]

ASYNC = ["rollout.async_steps=1", "algorithm.importance_sampling=token", "trainer.eval_steps=0",
         "trainer.export_at_end=false"]
COMPARED = ("reward/mean", "reward/format/mean", "reward/accuracy/mean", "train/loss", "train/grad_norm",
            "train/is_weight", "completion/length_mean", "rollout/weight_version", "rollout/staleness")


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout tail:\n{proc.stdout[-4000:]}\nstderr tail:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def disaggregated(assets, tmp_path_factory):
    """One uninterrupted 20-step disaggregated run (checkpoints every 2 steps join and save the in-flight
    batch): the learning test asserts on all of it, the kill -9 test uses its first 6 steps as the
    reference (the constant schedule makes steps 1-6 of a 20-step run those of a 6-step run)."""
    out = tmp_path_factory.mktemp("async") / "disaggregated"
    before = shm_names()
    proc = run_train(*assets, *ASYNC, "rollout.placement=disaggregated", "trainer.max_steps=20",
                     "checkpoint.save_steps=2", f"trainer.output_dir={out}")
    proc.shm_left = shm_left_after(before)  # what no_shm_leak checks, for this run
    return proc, out


def test_async_disaggregated_learns_one_version_stale(disaggregated):
    """20 steps with the engine in its own processes, generating step k+1 on the driver's thread while step k
    trains: staleness 0 at step 1 and exactly 1 afterwards, IS weights logged, reward rises."""
    proc, out = disaggregated
    _ok(proc)
    assert not proc.shm_left, f"left behind in /dev/shm: {proc.shm_left}"
    assert "on the driver's thread while step k trains" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["rollout/staleness"] for r in rows] == [0.0] + [1.0] * 19
    assert [r["rollout/weight_version"] for r in rows] == [0.0] + [float(s - 2) for s in range(2, 21)]
    assert all("time/rollout_wait" in r and "train/is_weight" in r for r in rows)
    first = sum(r["reward/mean"] for r in rows[:5]) / 5  # seen: 0.047 -> 0.34 (30 steps: 0.08 -> 0.51 over 10)
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last >= 2 * first, (first, last)


def test_async_kill9_resume_equals_uninterrupted_and_colocated_equals_disaggregated(assets, disaggregated, tmp_path):
    """Reference: the uninterrupted disaggregated run (checkpoints join and save the in-flight batch).
    A colocated run killed -9 at a random step and resumed gives the same metrics at every step: steps
    before the kill show the colocated schedule equals the overlapping one, steps after it the exact resume."""
    common = [*assets, *ASYNC, "trainer.max_steps=6", "checkpoint.save_steps=2"]
    ref, ref_dir = disaggregated
    run_dir = tmp_path / "killed"
    _ok(ref)
    reference = {r["step"]: r for r in metrics(ref_dir)}
    # keep_last=2 leaves steps 18 and 20: a checkpoint inside the run saves the batch in flight, the last none
    assert (ref_dir / "checkpoints" / "step_00000018" / "inflight_rollout.json").is_file()
    assert not (ref_dir / "checkpoints" / "step_00000020" / "inflight_rollout.json").exists()  # the last step

    kill_at = random.Random(os.environ.get("PYTEST_SEED", "0")).choice([3, 4, 5])
    colocated = [*common, "rollout.placement=colocated", f"trainer.output_dir={run_dir}"]
    resumed_from = kill9_at_step(train_cmd(*colocated), run_dir, kill_at)
    assert resumed_from < 6, "the run finished before it was killed"

    resumed = run_train(*colocated, "checkpoint.resume=auto")
    _ok(resumed)
    assert f"at step {resumed_from}" in resumed.stdout, resumed.stdout[-2000:]
    assert "no overlap" in resumed.stdout
    rows = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in COMPARED:
            assert rows[step][key] == reference[step][key], (step, key, rows[step][key], reference[step][key])
