"""slurm/grpo_8node.sh and slurm/grpo_disaggregated.sh on a real Slurm cluster (tests/slurm/cluster.py).

A slurmctld and two slurmd "nodes" run on this machine (installed with apt-get when missing; the test
fails, never skips, when that is impossible). The batch scripts run unchanged.

* The two core tests run the REAL trainer (the scripts' default `TRAIN_CMD`, `python -m megatron_grpo.cli
  train`) with the tiny CPU config on 2 nodes x 1 rank (TP=1 -> DP=2, gloo): a plain `sbatch --wait`
  that checkpoints every step until `scancel --signal=TERM` (one job), and USR1 mid-run -> checkpoint
  -> requeue -> resume -> completion.
  Where each rank ran comes from `GRPO_RANK_INFO=1` (slurm/launch_rank.sh prints one line per rank
  just before it `exec`s the trainer; srun `--label` prefixes it with the task id).
* The disaggregated node split (slurm/grpo_disaggregated.sh) runs the real programs too: a vLLM rollout
  server (GRPO_ROLE=rollout) on node1 feeding the trainer on node2.
* A failing rank runs on a stand-in per-rank command (`false`): it tests the script, in seconds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm import cluster as slurm_cluster

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/grpo_tiny_cpu.yaml"
# Small and fast: 2 ranks x (start-up ~1 min + ~1-2 s per step) on 2 shared cores.
TRAINER_OVERRIDES = ("trainer.eval_steps=0 trainer.export_at_end=false checkpoint.save_steps=2 "
                     "rollout.num_generations=4 algorithm.num_prompts_per_step=4 algorithm.micro_batch_size=16 "
                     "logging.tensorboard=false")
JOB_TIMEOUT_S = 600  # a trainer job under heavy machine load; normally ~1.5-2 min

pytestmark = pytest.mark.slow
pytestmark = [pytestmark, pytest.mark.slurm, pytest.mark.vllm]


@pytest.fixture(scope="module")
def cluster():
    # not under pytest's tmp dir: that is private to root (0700), and munged runs as the munge user
    state = Path(tempfile.mkdtemp(prefix="mgrpo-slurm-ci-", dir="/tmp"))
    t0 = time.monotonic()
    try:
        c = slurm_cluster.up(state, nodes=2, gpus_per_node=2, cpus_per_node=4, owner_pid=os.getpid())
    except slurm_cluster.ClusterError as e:
        slurm_cluster.down(state)
        pytest.fail(f"could not bring up the local Slurm cluster: {e}", pytrace=False)
    print(f"slurm cluster up in {time.monotonic() - t0:.1f} s")
    try:
        yield c
    finally:
        pids = c.daemon_pids()
        slurm_cluster.down(state)
        leftovers = {k: p for k, p in pids.items() if slurm_cluster._alive(p)}
        shutil.rmtree(state, ignore_errors=True)
        assert not leftovers, f"daemons still running after teardown: {leftovers}"


@pytest.fixture(scope="module")
def asset_overrides(assets) -> str:
    """The shared tiny model and data (tests/conftest.py; on the filesystem both "nodes" share) as job overrides."""
    return " ".join(assets)


def _job_env(c, out: Path, **extra) -> dict:
    env = c.env()
    env.update(CONFIG=CONFIG, OUTPUT_DIR=str(out / "run"), REPO_DIR=str(REPO), NODES="2", GPUS_PER_NODE="1",
               TIME_LIMIT="30", LOG_DIR=str(out), PLAN_CHECK="1", GRPO_RANK_INFO="1")
    env.pop("TRAIN_CMD", None)  # the scripts' default: the real trainer
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _log(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(out.glob("*.out")))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in _jsonl(path)] if path.is_file() else []


RANK_LINE = re.compile(r"^(\d+): \[grpo-rank\] rank (\d+)/(\d+) local (\d+) node (\d+) on (\S+) "
                       r"\(SLURMD_NODENAME=(\S*) restart (\d+) CUDA_VISIBLE_DEVICES=(\S*) pid (\d+)\)$", re.M)


def _rank_lines(log: str) -> list[dict]:
    """slurm/launch_rank.sh's GRPO_RANK_INFO lines (srun --label prefixes the task id)."""
    keys = ("task", "rank", "world", "local", "node", "hostname", "slurmd", "restart", "cvd", "pid")
    rows = [dict(zip(keys, m.groups())) for m in RANK_LINE.finditer(log)]
    return sorted(rows, key=lambda r: (int(r["restart"]), int(r["rank"])))


def _placement(log: str) -> list[tuple]:
    """(restart, task, rank, world, hostname, SLURMD_NODENAME) per rank start."""
    return [(int(r["restart"]), int(r["task"]), int(r["rank"]), int(r["world"]), r["hostname"], r["slurmd"])
            for r in _rank_lines(log)]


def _jobcomp(c) -> list[dict]:
    """Finished-job records (JobCompType=jobcomp/filetxt): JobId -> fields."""
    path = c.root / "log" / "jobcomp.txt"
    recs = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        recs.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return recs


def _rng_files(run: Path, step: int) -> list[str]:
    """The per-rank RNG states in a checkpoint: every trainer rank writes its own file."""
    return sorted(p.name for p in (run / "checkpoints" / f"step_{step:08d}" / "rng").glob("rank_*.pt"))


def _complete(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir() if (p / "COMPLETE").is_file()) if root.is_dir() else []


def _signal_after_step(cluster, cmd: list[str], cwd, env: dict, log_dir: Path, *scancel_args: str,
                       step: int = 2) -> tuple[str, int, str]:
    """Submit with `--wait --parsable`, wait until the run's metrics reach `step`, then `scancel
    *scancel_args JOB` and wait for the job, which must end 0. Returns (job id, last step seen before
    the signal, the job's log)."""
    run = Path(env["OUTPUT_DIR"])
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = ""
    try:
        job = p.stdout.readline().strip()
        assert job.isdigit(), f"no job id: {job!r} {p.stderr.read() if p.poll() is not None else ''}"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not any(s >= step for s in _steps(run)):
            assert p.poll() is None, f"job ended before it was signalled:\n{_log(log_dir)}"
            assert time.monotonic() < deadline, f"step {step} not reached:\n{_log(log_dir)}"
            time.sleep(0.2)
        seen = max(_steps(run))
        t_sig = time.monotonic()
        sig = cluster.run("scancel", *scancel_args, job, check=False)
        assert sig.returncode == 0, sig.stderr
        out, err = p.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
            if job:
                cluster.run("scancel", job, check=False)
    print(f"signalled after step {seen} at {t_sig - t0:.1f} s; job done after {time.monotonic() - t0:.1f} s")
    log = _log(log_dir)
    assert p.returncode == 0, f"{out}{err}\n{log}\n{cluster.log_tail()}"
    return job, seen, log


def test_usr1_checkpoints_requeues_and_resumes_real_trainer(cluster, asset_overrides, tmp_path):
    """Signal the batch shell exactly as --signal=B:USR1@N does near the time limit, after step 2: the
    trainer finishes its step, checkpoints and exits 0, the script requeues the job, and the second run
    resumes from that checkpoint and completes; every step is in metrics.jsonl exactly once."""
    max_steps = 6
    env = _job_env(cluster, tmp_path, OVERRIDES=f"{asset_overrides} {TRAINER_OVERRIDES} trainer.max_steps={max_steps}")
    run = tmp_path / "run"
    job, seen, log = _signal_after_step(cluster, [str(REPO / "slurm" / "submit.sh"), "--wait", "--parsable"],
                                        tmp_path, env, tmp_path, "--batch", "--signal=USR1")

    assert "batch shell got SIGUSR1" in log and f"requeueing job {job} (restart 1)" in log, log
    saved = [int(k) for k in re.findall(r"preemption signal 10: checkpoint of step (\d+) saved; exiting", log)]
    assert len(saved) == 1 and seen <= saved[0] < max_steps, (seen, saved, log)
    k = saved[0]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(run / "checkpoints" / f"step_{k:08d}"), str(k))], (resumed, log)
    assert log.count("0: [megatron-grpo] layout tp=1 pp=1 dp=2") == 2, log
    assert _steps(run) == list(range(1, max_steps + 1)), (_steps(run), log)  # each step exactly once
    assert f"step_{max_steps:08d}" in _complete(run)
    assert _rng_files(run, max_steps) == ["rank_00000.pt", "rank_00001.pt"]
    # both runs: one rank per node
    assert _placement(log) == [(0, 0, 0, 2, "node1", "node1"), (0, 1, 1, 2, "node2", "node2"),
                               (1, 0, 0, 2, "node1", "node1"), (1, 1, 1, 2, "node2", "node2")], log
    states = [(rec.get("JobId"), rec.get("JobState"), rec.get("ExitCode")) for rec in _jobcomp(cluster)
              if rec.get("JobId") == job]
    assert states and states[-1] == (job, "COMPLETED", "0:0"), states


def test_failed_rank_fails_the_job(cluster, tmp_path):
    """A non-zero rank exit must surface as a non-zero `sbatch --wait` (MinJobAge, --kill-on-bad-exit)."""
    env = _job_env(cluster, tmp_path, TRAIN_CMD="false")
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--wait"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, f"{r.stdout}{r.stderr}\n{_log(tmp_path)}"
    assert "done: exit status 1" in _log(tmp_path)


def test_disaggregated_node_split_real_trainer_and_rollout_server(cluster, asset_overrides, tmp_path):
    """The node split with the real programs: node1 runs the rollout step (a vLLM rollout server,
    GRPO_ROLE=rollout), node2 the training step (GRPO_ROLE=train); the trainer's rank 0 listens at
    GRPO_TRANSFER_ADDR:PORT (node2), the server connects, generates every rollout and takes every
    weight update; the job checkpoints, the server exits 0 when training ends."""
    env = _job_env(cluster, tmp_path, ROLLOUT_NODES=1,
                   OVERRIDES=f"{asset_overrides} {TRAINER_OVERRIDES} trainer.max_steps=2")
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--script", str(REPO / "slurm" / "grpo_disaggregated.sh"),
                        "--wait"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    print(f"job took {time.monotonic() - t0:.1f} s")
    log = _log(tmp_path)
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log}\n{cluster.log_tail()}"
    # two worlds of one rank each: rollout on node1, training on node2, each with its own master
    assert sorted(_placement(log)) == [(0, 0, 0, 1, "node1", "node1"), (0, 0, 0, 1, "node2", "node2")], log
    assert "GRPO_ROLE=rollout,MASTER_ADDR=node1" in log and "GRPO_ROLE=train,MASTER_ADDR=node2" in log, log
    assert "transfer node2:" in log and "rollout.placement=disaggregated" in log
    # the trainer (node2) was fed by the server on node1, which ran the real vLLM engine
    assert "0: [megatron-grpo] 1 rollout replica(s) ready" in log and "replica 0 on node1 (rollout rank 0)" in log, log
    assert "0: [megatron-grpo rollout 0] vLLM engine up" in log and "replica 0 of 1" in log, log
    assert "0: [megatron-grpo] layout tp=1 pp=1 dp=1" in log, log
    run = tmp_path / "run"
    assert _steps(run) == [1, 2], log
    assert _complete(run) == ["step_00000002"]
    # training ended, then the server left cleanly (told by the trainer) and the job succeeded
    assert "[megatron-grpo rollout 0] shutdown by the trainer: exiting" in log, log
    assert "rollout step exit 0" in log and "done: exit status 0" in log, log


def test_sbatch_two_nodes_real_trainer_then_scancel_sigterm_checkpoints_and_exits_cleanly(cluster, asset_overrides,
                                                                                    tmp_path):
    """Plain `sbatch --wait` of the unchanged script (command-line flags override the #SBATCH 8-node
    defaults; the script takes the shape from the allocation) running the real trainer: one rank per
    node, DP=2 across them, a checkpoint every step (checkpoint.keep_last=2 of them kept).
    Then `scancel --signal=TERM JOB`: every process of the job's steps -- both ranks and every helper they
    started (reward workers, dist_checkpointing's results-queue manager) -- gets SIGTERM at once, while
    checkpoints are written every step. The ranks agree, finish the step, write a checkpoint that
    verifies (both ranks' RNG states) and exit 0; the job ends 0, without a traceback or a broken pipe.
    (`--full`, which adds the batch shell, made Slurm 22.05 cancel the job here: KillWait, then SIGKILL.)
    One job checks both: the run to completion is test_usr1_checkpoints_requeues_and_resumes_real_trainer's."""
    from megatron_grpo.trainer.checkpoint import verify_checkpoint

    max_steps = 40
    env = _job_env(cluster, tmp_path, OVERRIDES=f"{asset_overrides} {TRAINER_OVERRIDES} trainer.max_steps={max_steps} "
                                                "checkpoint.save_steps=1")
    del env["NODES"], env["GPUS_PER_NODE"]  # the script must take the shape from the allocation
    run = tmp_path / "run"
    job, seen, log = _signal_after_step(
        cluster, ["sbatch", "--wait", "--parsable", "--nodes=2", "--gpus-per-node=1", "--time=30",
                  f"--output={tmp_path}/%x-%j.out", "slurm/grpo_8node.sh"], REPO, env, tmp_path, "--signal=TERM")
    # the plain sbatch: each rank on its own node (hostname = node name in the node's UTS namespace), as
    # Slurm placed it
    assert _placement(log) == [(0, 0, 0, 2, "node1", "node1"), (0, 1, 1, 2, "node2", "node2")], log
    assert all(x["cvd"] == "0" and x["local"] == "0" for x in _rank_lines(log))  # --gpus-per-node=1 honoured
    assert "2 nodes x 1 GPUs on node1 node2" in log and "MASTER_ADDR=node1" in log, log
    assert "megatron_grpo.cli train --config configs/grpo_tiny_cpu.yaml" in log, log  # the real trainer
    # one process group of both ranks: data parallel over the two nodes
    assert "0: [megatron-grpo] layout tp=1 pp=1 dp=2" in log, log
    # SIGTERM: one checkpoint on the signal, of a step at or after the one seen
    saved = [int(k) for k in re.findall(r"preemption signal 15: checkpoint of step (\d+) saved; exiting", log)]
    assert len(saved) == 1 and seen <= saved[0] < max_steps, (seen, saved, log)
    k = saved[0]
    assert verify_checkpoint(run / "checkpoints" / f"step_{k:08d}") is None
    assert _rng_files(run, k) == ["rank_00000.pt", "rank_00001.pt"]  # each trainer rank saved its own state
    assert _steps(run) == list(range(1, k + 1)), (_steps(run), log)
    # checkpoint.save_steps=1 wrote every step's; keep_last=2 kept the last two (k >= seen >= 2)
    assert _complete(run) == [f"step_{k - 1:08d}", f"step_{k:08d}"], (_complete(run), log)
    assert "Traceback" not in log and "Broken pipe" not in log and not re.search(r"^\d+: error:", log, re.M), log
    assert "done: exit status 0" in log and "requeueing" not in log, log
