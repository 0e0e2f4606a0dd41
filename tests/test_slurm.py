"""slurm/grpo_8node.sh and slurm/grpo_disaggregated.sh on a real Slurm cluster (tests/slurm/cluster.py).

A slurmctld and two slurmd "nodes" run on this machine (installed with apt-get when missing; the test
fails, never skips, when that is impossible). The batch scripts run unchanged; only the per-rank
command is switched to a real torch.distributed payload (tests/slurm/payload.py) with the trainer's
command line, checkpoint protocol and signal handling. To run the real trainer instead, change
TRAIN_CMD below to the default (`python -m megatron_grpo.cli train`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm import cluster as slurm_cluster

REPO = Path(__file__).resolve().parent.parent
TRAIN_CMD = f"{sys.executable} {REPO / 'tests' / 'slurm' / 'payload.py'}"  # the real trainer: "" (default)
CONFIG = "configs/grpo_tiny_cpu.yaml"

pytestmark = pytest.mark.slow


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


def _job_env(c, out: Path, **extra) -> dict:
    env = c.env()
    env.update(TRAIN_CMD=TRAIN_CMD, CONFIG=CONFIG, OUTPUT_DIR=str(out / "run"), REPO_DIR=str(REPO),
               PAYLOAD_STEP_SECONDS="0.2", NODES="2", GPUS_PER_NODE="1", TIME_LIMIT="30",
               LOG_DIR=str(out), PLAN_CHECK="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _log(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(out.glob("*.out")))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ranks(run: Path, restart: int = 0) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (run / "ranks").glob(f"restart{restart}_rank*.json")),
                  key=lambda r: r["rank"])


def _jobcomp(c) -> list[dict]:
    """Finished-job records (JobCompType=jobcomp/filetxt): JobId -> fields."""
    path = c.root / "log" / "jobcomp.txt"
    recs = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        recs.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return recs


def test_sbatch_two_nodes_all_ranks_take_part_and_checkpoint(cluster, tmp_path):
    """Plain `sbatch --wait` with command-line flags overriding the #SBATCH 8-node defaults."""
    env = _job_env(cluster, tmp_path, OVERRIDES="trainer.max_steps=5 checkpoint.save_steps=2")
    del env["NODES"], env["GPUS_PER_NODE"]  # the script must take the shape from the allocation
    r = subprocess.run(["sbatch", "--wait", "--nodes=2", "--gpus-per-node=1", "--time=30",
                        f"--output={tmp_path}/%x-%j.out", "slurm/grpo_8node.sh"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    log = _log(tmp_path)
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log}\n{cluster.log_tail()}"
    run = tmp_path / "run"
    ranks = _ranks(run)
    assert [x["rank"] for x in ranks] == [0, 1], log
    assert {x["slurmd_nodename"] for x in ranks} == {"node1", "node2"}
    assert {x["hostname"] for x in ranks} == {"node1", "node2"}  # each rank on its own node
    assert [x["slurm_nodeid"] for x in ranks] == ["0", "1"] and all(x["local_rank"] == 0 for x in ranks)
    assert all(x["world_size"] == 2 and x["all_reduce"] == 3 and x["master"].startswith("node1:") for x in ranks)
    assert all(x["cuda_visible_devices"] == "0" for x in ranks)  # --gpus-per-node=1 was honoured
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000005"], ckpts  # save_steps=2 + final, keep_last=2
    assert (run / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    assert json.loads((run / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())["step"] == 5
    assert [line.split()[0] for line in (run / "steps.log").read_text().split("\n") if line] == list("12345")
    assert "2 nodes x 1 GPUs on node1 node2" in log and "MASTER_ADDR=node1" in log


def test_failed_rank_fails_the_job(cluster, tmp_path):
    """A non-zero rank exit must surface as a non-zero `sbatch --wait` (MinJobAge, --kill-on-bad-exit)."""
    env = _job_env(cluster, tmp_path, TRAIN_CMD="false")
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--wait"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, f"{r.stdout}{r.stderr}\n{_log(tmp_path)}"
    assert "done: exit status 1" in _log(tmp_path)


def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """Signal the batch shell exactly as --signal=B:USR1@N does near the time limit; the ranks save and
    exit 0, the script requeues the job, and the second run resumes from that checkpoint."""
    max_steps = 40
    env = _job_env(cluster, tmp_path, OVERRIDES=f"trainer.max_steps={max_steps} checkpoint.save_steps=0",
                   PAYLOAD_STEP_SECONDS=0.25)
    run = tmp_path / "run"
    p = subprocess.Popen([str(REPO / "slurm" / "submit.sh"), "--wait", "--parsable"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = p.stdout.readline().strip()
        assert job.isdigit(), f"no job id: {job!r} {p.stderr.read() if p.poll() is not None else ''}"
        steps = run / "steps.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (steps.is_file() and len(steps.read_text().split("\n")) > 4):
            assert p.poll() is None, f"job ended before it was signalled:\n{_log(tmp_path)}"
            time.sleep(0.1)
        sig = cluster.run("scancel", "--batch", "--signal=USR1", job, check=False)
        assert sig.returncode == 0, sig.stderr
        out, err = p.communicate(timeout=150)
    finally:
        if p.poll() is None:
            p.kill()
            cluster.run("scancel", job, check=False)
    log = _log(tmp_path)
    assert p.returncode == 0, f"{out}{err}\n{log}\n{cluster.log_tail()}"

    events = _jsonl(run / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "preempted", "start", "done"], f"{events}\n{log}"
    first, pre, second, done = events
    assert first["restart"] == 0 and first["resumed_from"] == 0
    assert pre["signal"] == 10 and 0 < pre["step"] < max_steps  # SIGUSR1 reached the ranks mid-run
    assert second["restart"] == 1 and second["resumed_from"] == pre["step"] > 0  # resumed from that checkpoint
    assert done["step"] == max_steps and second["job"] == first["job"] == job
    rows = [tuple(map(int, line.split())) for line in (run / "steps.log").read_text().split("\n") if line]
    assert [s for s, _ in rows] == list(range(1, max_steps + 1)), rows  # continuous: no step lost or repeated
    assert all(r == (0 if s <= pre["step"] else 1) for s, r in rows)
    assert {x["slurmd_nodename"] for x in _ranks(run, restart=1)} == {"node1", "node2"}
    assert (run / "checkpoints" / f"step_{max_steps:08d}" / "COMPLETE").is_file()
    assert "batch shell got SIGUSR1" in log and f"requeueing job {job} (restart 1)" in log
    states = [(rec.get("JobId"), rec.get("JobState"), rec.get("ExitCode")) for rec in _jobcomp(cluster)
              if rec.get("JobId") == job]
    assert states and states[-1] == (job, "COMPLETED", "0:0"), states


def test_disaggregated_split_roles_and_rendezvous(cluster, tmp_path):
    """Node split: node1 runs the rollout world, node2 the training world; they meet at the transfer port."""
    env = _job_env(cluster, tmp_path, ROLLOUT_NODES=1, OVERRIDES="trainer.max_steps=4 checkpoint.save_steps=0")
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--script", str(REPO / "slurm" / "grpo_disaggregated.sh"),
                        "--wait"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = _log(tmp_path)
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log}\n{cluster.log_tail()}"
    run = tmp_path / "run"
    train, rollout = _ranks(run), _ranks(run / "rollout")
    assert [(x["role"], x["slurmd_nodename"], x["rank"], x["world_size"]) for x in train] == [("train", "node2", 0, 1)]
    assert [(x["role"], x["slurmd_nodename"], x["rank"], x["world_size"]) for x in rollout] == \
        [("rollout", "node1", 0, 1)]
    assert train[0]["master"] != rollout[0]["master"]  # two separate worlds
    assert json.loads((run / "transfer.json").read_text()) == {"role": "train", "train": "node2", "rollout": "node1"}
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert "rollout.placement=disaggregated" in log and "rollout step exit" in log
