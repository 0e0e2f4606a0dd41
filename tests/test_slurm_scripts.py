"""The Slurm scripts without a cluster: shellcheck, dry runs (64 ranks for 8 nodes), the submit wrapper's
sbatch flags and plan check, and the rank layout against megatron-core's own RankGenerator."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grpo.config import load_config
from tests.slurm.cluster import ClusterError, ensure_packages

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
CONFIG_8NODE = "configs/grpo_qwen2.5_7b_8node.yaml"
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)(?:\s+(\d+))?\s*$")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in
           ("NODES", "GPUS_PER_NODE", "CONFIG", "OVERRIDES", "OUTPUT_DIR", "TRAIN_CMD", "ROLLOUT_NODES", "REPO_DIR",
            "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "PARTITION", "ACCOUNT", "LOG_DIR", "DRY_RUN", "PYTHON")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _rows(text: str) -> list[tuple]:
    return [tuple(int(g) if g and g.isdigit() else g for g in m.groups()) for m in map(ROW.match, text.splitlines()) if m]


def test_shellcheck_clean():
    try:
        ensure_packages(binaries=("shellcheck",), packages=("shellcheck",))
    except ClusterError as e:
        pytest.fail(f"shellcheck is needed for this test: {e}", pytrace=False)
    assert len(SCRIPTS) >= 4, SCRIPTS
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd="/", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_8_nodes_shows_64_ranks_and_the_config_split():
    cfg = load_config(REPO / CONFIG_8NODE)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = 64 // (tp * pp)
    r = subprocess.run(["bash", "slurm/grpo_8node.sh"], cwd=REPO, env=_clean_env(DRY_RUN=1, CONFIG=CONFIG_8NODE),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "sbatch --job-name=grpo --nodes=8 --gpus-per-node=8" in out and "--signal=B:USR1@300 --requeue" in out
    assert "srun --nodes=8 --ntasks=64 --ntasks-per-node=8" in out and "slurm/launch_rank.sh" in out
    assert f"-m megatron_grpo.cli train --config {CONFIG_8NODE} checkpoint.resume=auto" in out
    assert f"world=64 ranks (8 nodes x 8 GPUs) TP={tp} PP={pp} DP={dp}" in out
    rows = _rows(out)
    assert [row[0] for row in rows] == list(range(64))
    for rank, node, host, local, t, p, d, replica in rows:
        assert (node, host, local) == (rank // 8, f"node{rank // 8}", rank % 8)
        assert (t, p, d) == (rank % tp, rank // (tp * dp), (rank // tp) % dp)
        assert replica == rank // cfg.rollout.tp


def test_plan_layout_matches_megatron_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    sys.path.insert(0, str(REPO / "slurm"))
    try:
        import plan
    finally:
        sys.path.remove(str(REPO / "slurm"))
    for tp, pp, dp in [(4, 2, 8), (2, 4, 2), (8, 1, 3), (1, 1, 4)]:
        gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        for kind, index in (("tp", 0), ("pp", 1), ("dp", 2)):
            for group in gen.get_ranks(kind):
                for pos, rank in enumerate(group):
                    assert plan.coords(rank, tp, dp)[index] == pos, (tp, pp, dp, kind, group)


@pytest.fixture
def fake_sbatch(tmp_path):
    """An `sbatch` on PATH that records its arguments and the job's environment instead of submitting."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.args"
    (bindir / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\nenv > {log}.env\necho 4242\n')
    (bindir / "sbatch").chmod(0o755)
    return bindir, log


def test_submit_turns_env_into_sbatch_flags(fake_sbatch, tmp_path):
    bindir, log = fake_sbatch
    env = _clean_env(PATH=f"{bindir}:{os.environ['PATH']}", NODES=2, GPUS_PER_NODE=4, PARTITION="batch",
                     ACCOUNT="proj", TIME_LIMIT="00:30:00", LOG_DIR=tmp_path / "logs", CONFIG=CONFIG_8NODE,
                     OUTPUT_DIR="out", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.06-py3")
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--parsable", "--", "trainer.max_steps=7"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "4242"  # stdout is sbatch's alone (plan summary goes to stderr)
    assert "world=8 ranks (2 nodes x 4 GPUs) TP=4 PP=2 DP=1" in r.stderr
    args = log.read_text().splitlines()
    for flag in ("--nodes=2", "--gpus-per-node=4", "--partition=batch", "--account=proj", "--time=00:30:00",
                 "--signal=B:USR1@300", "--requeue", "--exclusive", "--open-mode=append", "--parsable",
                 f"--output={tmp_path}/logs/%x-%j.out"):
        assert flag in args, (flag, args)
    assert args[-2:] == [str(REPO / "slurm" / "grpo_8node.sh"), "trainer.max_steps=7"]
    job_env = dict(line.split("=", 1) for line in Path(f"{log}.env").read_text().splitlines() if "=" in line)
    assert job_env["REPO_DIR"] == str(REPO) and job_env["OUTPUT_DIR"] == str(tmp_path / "out")
    assert job_env["CONTAINER_IMAGE"] == "nvcr.io#nvidia/pytorch:25.06-py3" and job_env["CONFIG"] == CONFIG_8NODE


@pytest.mark.parametrize("nodes, why", [(3, "do not split evenly over data parallel 3"),
                                        (1, "world size 8 .* is not divisible by parallel.tp x parallel.pp")])
def test_submit_refuses_a_bad_split_before_sbatch(fake_sbatch, tmp_path, nodes, why):
    bindir, log = fake_sbatch
    env = _clean_env(PATH=f"{bindir}:{os.environ['PATH']}", NODES=nodes, GPUS_PER_NODE=8, CONFIG=CONFIG_8NODE)
    if nodes == 1:
        env["OVERRIDES"] = "parallel.tp=4 parallel.pp=4"
    r = subprocess.run([str(REPO / "slurm" / "submit.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and re.search(why, r.stderr), r.stderr
    assert "nothing submitted" in r.stderr and not log.exists()


def test_submit_dry_run_with_container_and_overrides(tmp_path):
    env = _clean_env(NODES=4, GPUS_PER_NODE=8, CONFIG=CONFIG_8NODE, CONTAINER_IMAGE="/shared/mg.sqsh",
                     OUTPUT_DIR="/shared/runs/x", OVERRIDES="trainer.max_steps=3")
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--dry-run", "--qos=high", "--nodes=2", "--",
                        "optimizer.lr=2e-6"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "--qos=high" in out and out.count("optimizer.lr=2e-6") >= 2 and "--nodes=2 " in out
    assert "--nodes=4" not in out  # a --nodes flag given to submit.sh wins over NODES
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert f"--container-image=/shared/mg.sqsh --container-mounts={REPO}:{REPO},/shared/runs/x:/shared/runs/x" in srun
    assert f"--container-workdir={REPO}" in srun and " python -m megatron_grpo.cli train" in srun  # container's python
    assert srun.endswith("trainer.output_dir=/shared/runs/x checkpoint.resume=auto trainer.max_steps=3 optimizer.lr=2e-6")
    assert len(_rows(out)) == 16


def test_disaggregated_dry_run_splits_nodes():
    env = _clean_env(DRY_RUN=1, CONFIG=CONFIG_8NODE, NODES=8, ROLLOUT_NODES=4)
    r = subprocess.run(["bash", "slurm/grpo_disaggregated.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    sruns = [line for line in out.splitlines() if line.startswith("srun ")]
    assert len(sruns) == 2
    assert "--nodes=4 --ntasks=32" in sruns[0] and "--nodelist=node0,node1,node2,node3" in sruns[0]
    assert "GRPO_ROLE=rollout,MASTER_ADDR=node0" in sruns[0]
    assert "--nodelist=node4,node5,node6,node7" in sruns[1] and "GRPO_ROLE=train,MASTER_ADDR=node4" in sruns[1]
    assert all(s.endswith("rollout.placement=disaggregated") for s in sruns)
    assert "weight transfer rendezvous node4:" in out
    assert "rollout world=32 ranks (4 nodes)" in out and "world=32 ranks (4 nodes x 8 GPUs)" in out
    rows = _rows(out)
    assert len(rows) == 32 and rows[0][1] == 4 and rows[-1][1] == 7  # training ranks live on nodes 4..7

    bad = subprocess.run(["bash", "slurm/grpo_disaggregated.sh"], cwd=REPO, capture_output=True, text=True,
                         env=_clean_env(DRY_RUN=1, CONFIG=CONFIG_8NODE, NODES=8, ROLLOUT_NODES=8), timeout=60)
    assert bad.returncode == 2 and "ROLLOUT_NODES=8 must be in [1, 7]" in bad.stderr


def test_batch_script_outside_slurm_refuses_to_run():
    r = subprocess.run(["bash", "slurm/grpo_8node.sh"], cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr


def test_launch_rank_maps_slurm_task_env():
    env = _clean_env(SLURM_PROCID=13, SLURM_LOCALID=5, SLURM_NTASKS=64, SLURM_NODEID=1, GPUS_PER_NODE=8,
                     MASTER_ADDR="n0", MASTER_PORT=12345)
    r = subprocess.run(["bash", "slurm/launch_rank.sh", "sh", "-c",
                        "echo $RANK $LOCAL_RANK $WORLD_SIZE $NODE_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR:$MASTER_PORT"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["13", "5", "64", "1", "8", "n0:12345"], r.stderr
    assert shutil.which("bash")
