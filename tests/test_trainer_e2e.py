"""The whole stack end to end through the CLI: learning, TP/PP layouts, exact resume, a lost rank.

Each run is a real `megatron-grpo train` (vLLM rollouts, math-verify rewards, megatron-core policy,
weight sync) on the tiny CPU config; runs are grouped so the file stays within a few minutes.
"""
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_grpo.testing.torchrun import free_port
from tests.e2e import (REPO, alive, descendants, env, kill_tree, metrics, run_train,
                       shm_left_after, shm_names, train_cmd)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]  # see tests/conftest.py
pytestmark = [*pytestmark, pytest.mark.vllm]  # the 3.12 lane has no vLLM


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout tail:\n{proc.stdout[-4000:]}\nstderr tail:\n{proc.stderr[-4000:]}"


def _parity(stdout: str) -> float:
    line = next(l for l in stdout.splitlines() if "step-1 logprob parity" in l)
    return float(line.rsplit(":", 1)[1])


# TP=2 x PP=2 on 4 ranks: tests/test_recipes.py's test_qwen7b_8node_recipe (the same checks, with sequence
# parallel, the distributed optimizer and vLLM TP=2; one 4-rank run in the suite instead of two).
@pytest.mark.parametrize("tp,pp,nproc", [(1, 2, 2)])
def test_layouts_complete(assets, tmp_path, tp, pp, nproc):
    out = tmp_path / "run"
    proc = run_train(*assets, f"trainer.output_dir={out}", "trainer.max_steps=3", "trainer.eval_steps=3",
                     "checkpoint.save_steps=0", f"parallel.tp={tp}", f"parallel.pp={pp}", nproc=nproc)
    _ok(proc)
    assert f"layout tp={tp} pp={pp} dp={nproc // (tp * pp)}" in proc.stdout
    assert _parity(proc.stdout) <= 1e-3
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/skipped"] == 0.0 for r in rows)
    assert "eval/accuracy" in rows[-1]
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert (out / "export_hf" / "model.safetensors").is_file()


COMPARED = ("reward/mean", "reward/format/mean", "reward/accuracy/mean", "train/loss", "train/grad_norm",
            "train/clip_frac_low", "train/clip_frac_high", "completion/length_mean")


def _rank_pids(root_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != root_pid:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace")
    except OSError:
        return "?"


def _forked_children(pid: int) -> list[int]:
    """Children of ``pid`` with its own command line: processes it forked without exec (megatron's
    checkpoint writers)."""
    own = _cmdline(pid)
    return [c for c in descendants(pid) if _cmdline(c) == own]


def _processes_of(run_dir: Path) -> dict[int, str]:
    """Every live process (zombies count as gone) whose command line names ``run_dir``."""
    named = f"trainer.output_dir={run_dir}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if named in args and alive([int(entry.name)]):
            found[int(entry.name)] = _cmdline(int(entry.name))
    return found


def _lose_rank_1_during_a_save(overrides: list[str], run_dir: Path, log: Path) -> tuple[int, float, str, dict]:
    """Run training under torchrun (as `srun torchrun ...` would) and SIGKILL rank 1 (a lost node or GPU)
    while its checkpoint writers run, in a save after step 3; returns (exit status, seconds from the kill
    to the job's end, its log, the job's processes still alive 30 s later)."""
    cmd = [os.sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megatron_grpo.cli", "train",
           "--config", str(REPO / "configs" / "grpo_tiny_cpu.yaml"), *overrides, f"trainer.output_dir={run_dir}"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, ranks = time.monotonic() + 600, {}
        while True:  # rank 1 in a save, with its forked writers, after step 3
            assert proc.poll() is None, "the run ended before rank 1 was caught saving:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 1 was not caught saving within 600 s"
            if len(ranks) < 2:
                ranks = _rank_pids(proc.pid)
            elif ((run_dir / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(run_dir))
                  and _forked_children(ranks[1])):
                break
            time.sleep(0.02)
        job = descendants(proc.pid)  # ranks and their helpers (reward pool, checkpoint queue, writers, ...)
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        rc = proc.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    # nothing of the job outlives it: helpers are immune to SIGTERM and used to stay as orphans; megatron's
    # forked checkpoint writers stayed blocked on their queue for good (fixed by megatron_grpo/lifetime.py)
    deadline = time.monotonic() + 30
    while (alive(job) or _processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {**{p: _cmdline(p) for p in alive(job)}, **_processes_of(run_dir)}
    for p in left:  # so that a failure leaves nothing running either
        os.kill(p, signal.SIGKILL)
    return rc, elapsed, log.read_text(), left


def test_tp2_lost_rank_ends_the_job_fast_then_resume_is_bit_exact(assets, tmp_path):
    """TP=2 under torchrun: rank 1 is SIGKILLed while it writes a checkpoint. torchrun ends the job within
    120 s naming the rank, nothing of the job outlives it (megatron's forked checkpoint writers included),
    and the run resumed from its newest complete checkpoint gives the steps of an uninterrupted run, bit
    for bit. (A kill -9 of a whole job's process tree at a random step, then an exact resume:
    tests/test_moe_trainer.py and tests/test_async_rollout.py.)"""
    common = [*assets, "parallel.tp=2", "trainer.max_steps=6", "checkpoint.save_steps=2", "trainer.eval_steps=0",
              "trainer.export_at_end=false"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run_train(*common, f"trainer.output_dir={ref_dir}", nproc=2)
    _ok(ref)
    assert "layout tp=2 pp=1 dp=1" in ref.stdout
    reference = {r["step"]: r for r in metrics(ref_dir)}

    rc, elapsed, text, left = _lose_rank_1_during_a_save(common, run_dir, tmp_path / "log.txt")
    assert rc != 0 and elapsed < 120, (rc, elapsed)
    assert "rank: 1" in text or "local_rank: 1" in text, text[-3000:]
    assert not left, left
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert saved, "no complete checkpoint before the kill"
    resumed_from = int(saved[-1].split("_")[1])

    resumed = run_train(*common, f"trainer.output_dir={run_dir}", "checkpoint.resume=auto", nproc=2)
    _ok(resumed)
    assert resumed_from < 6, "the run finished before it was killed"
    assert f"at step {resumed_from}" in resumed.stdout, resumed.stdout[-2000:]
    rows = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]  # entries past the checkpoint were replaced, none duplicated
    for step in range(resumed_from + 1, 7):
        for key in COMPARED:
            assert rows[step][key] == reference[step][key], (step, key, rows[step][key], reference[step][key])


def test_disaggregated_engine_matches_colocated(assets, usr1_disaggregated, tmp_path):
    """vLLM in its own processes (weights over a process group) gives the same run as colocated vLLM.
    The disaggregated side is the USR1 test's run (same settings, max_steps=40: the constant schedule makes
    its first 2 steps those of a 2-step run); it is at step 2 or past it when the signal comes."""
    common = [*assets, "trainer.max_steps=2", "trainer.eval_steps=0", "checkpoint.save_steps=0",
              "trainer.export_at_end=false"]
    out = tmp_path / "colocated"
    proc = run_train(*common, "rollout.placement=colocated", f"trainer.output_dir={out}")
    _ok(proc)
    assert _parity(proc.stdout) <= 1e-3
    runs = {"colocated": metrics(out)}
    run = usr1_disaggregated
    assert run["returncode"] == 0, run["log"][-3000:]
    assert _parity(run["log"]) <= 1e-3
    runs["disaggregated"] = metrics(run["out"])[:2]
    assert [r["step"] for r in runs["colocated"]] == [r["step"] for r in runs["disaggregated"]] == [1, 2]
    for a, b in zip(runs["colocated"], runs["disaggregated"]):
        for key in ("reward/mean", "train/loss", "completion/length_mean"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("options", [
    ["algorithm.kl_coef=0.04", "algorithm.reference=swap", "algorithm.dynamic_sampling=true",
     "algorithm.overlong_filtering=true", "algorithm.importance_sampling=token", "algorithm.update_epochs=2",
     "algorithm.mini_batches=2", "algorithm.dual_clip=3.0", "algorithm.logprob_micro_batch_size=24"],
    ["algorithm.kl_coef=0.04", "algorithm.reference=copy", "algorithm.kl_in_reward=true",
     "algorithm.loss_agg=seq-mean-token-mean", "algorithm.adv_scale=batch", "algorithm.leave_one_out=true",
     "optimizer.scheduler=cosine", "optimizer.warmup_ratio=0.5"],
], ids=["swap-kl-dynamic-overlong-is-mu2", "copy-kl-in-reward-seqmean-batch-loo-cosine"])
def test_algorithm_options_run_through_the_trainer(assets, tmp_path, options):
    out = tmp_path / "run"
    proc = run_train(*assets, f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.eval_steps=0",
                     "checkpoint.save_steps=0", "trainer.export_at_end=false", *options)
    _ok(proc)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/skipped"] == 0.0
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN anywhere
    if "algorithm.kl_in_reward=true" in options:
        assert all(r["train/kl_loss"] == 0.0 for r in rows)  # KL moved into the reward: not in the loss
        assert rows[0]["train/lr"] == 0.0 and rows[1]["train/lr"] > 0.0  # warmup starts at 0
    else:
        # 4 updates per step (mu=2 x 2 mini-batches): KL to the frozen reference grows from 0 as the policy moves
        assert 0.0 < rows[0]["train/kl_ref"] < rows[1]["train/kl_ref"] < 0.5
        assert rows[0]["train/kl_loss"] > 0.0
        assert rows[0]["train/num_microbatches"] >= 1 and "dynamic_sampling/batches" in rows[0]
        assert "train/is_weight" in rows[0]


@pytest.fixture(scope="module")
def usr1_disaggregated(assets, tmp_path_factory):
    """A disaggregated run (max_steps=40) that gets SIGUSR1 in every process once step 2 is logged, as
    Slurm signals a job step; what it did, for the USR1 test and (its first 2 steps) the placement test.
    Its TMPDIR is its own, to see which socket files (vLLM's ZMQ channels) it leaves there."""
    out = tmp_path_factory.mktemp("usr1") / "run"
    tmp = out.parent / "tmp"
    tmp.mkdir()
    before = shm_names()
    cmd = train_cmd(*assets, "rollout.placement=disaggregated", "trainer.max_steps=40", "trainer.eval_steps=0",
                    "checkpoint.save_steps=0", "trainer.export_at_end=false", f"trainer.output_dir={out}")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2:
                break
            time.sleep(0.5)
        running = proc.poll() is None
        engine_pids = descendants(proc.pid) if running else []
        for pid in [proc.pid, *engine_pids] if running else []:  # what Slurm's --signal / scancel -s USR1 does
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    return {"returncode": proc.returncode, "log": log, "out": out, "running_at_step_2": running,
            "engine_pids": engine_pids, "shm_left": shm_left_after(before),
            "sockets_left": sorted(str(p) for p in tmp.rglob("*") if p.is_socket())}


def test_usr1_to_every_process_checkpoints_a_disaggregated_run(usr1_disaggregated):
    """Slurm signals every process of a job step: vLLM's own processes (in-job disaggregated engine)
    must survive SIGUSR1 so the trainer can finish its step, checkpoint and exit 0."""
    run = usr1_disaggregated
    out, log = run["out"], run["log"]
    assert run["running_at_step_2"], log[-3000:]
    assert run["engine_pids"], "the disaggregated engine runs in processes of its own"
    assert run["returncode"] == 0, log[-3000:]
    assert not run["shm_left"], f"left behind in /dev/shm: {run['shm_left']}"
    assert not run["sockets_left"], f"socket files left behind in TMPDIR: {run['sockets_left']}"
    saved = re.search(r"preemption signal \S+: checkpoint of step (\d+) saved", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 2 <= step < 40 and (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file(), step
