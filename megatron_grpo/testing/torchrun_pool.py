"""Warm torchrun rank pools: one torchrun launch per world size runs many test bodies in sequence.

Why: every torchrun launch pays ``import megatron.core`` (~10 CPU-s) on every rank before any work;
a test suite of ~30 launches spends most of its CPU there. A pool is started by torchrun once per
world size (real gloo process groups, as a fresh launch) and executes successive bodies.

Per body, each rank sets a fresh ``MASTER_PORT`` with itself (rank 0) as the c10d store host, so the
body's ``init_process_group`` gets a store no earlier body has written to; the body sees its caller's
environment of that call (plus torchrun's per-rank variables) and torch's start-up RNG seed, as in a
fresh launch. After the body each rank tears down megatron's model-parallel state and the default
process group and restores the working directory, torch's default dtype, thread count and grad mode.
A body that fails exits its rank (torchrun then ends the others, as in a fresh launch); a hang is killed
as a process group; either way that pool is gone and the next call starts a new one, so a failure is
reported per rank and never poisons the next test. ``MEGATRON_GRPO_DIST_WARM=0``: fresh launches only.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.02  # the caller's poll while a body runs
IDLE_POLL_MAX_S = 0.25  # an idle rank backs off to this (a pool may idle through many other tests)


def enabled() -> bool:
    return os.environ.get("MEGATRON_GRPO_DIST_WARM", "1") != "0"


class _Pool:
    def __init__(self, world_size: int, cmd_prefix: list, env: dict):
        self.world_size = world_size
        self.dir = Path(tempfile.mkdtemp(prefix=f"torchrun-pool{world_size}-"))
        self.log_path = self.dir / "combined.log"
        self.jobs = 0
        env = dict(env, MEGATRON_GRPO_POOL_OWNER=str(os.getpid()))
        (self.dir / "env.json").write_text(json.dumps(env))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*cmd_prefix, f"--log-dir={self.dir / 'elastic'}", "-m", "megatron_grpo.testing.torchrun_worker", "--pool",
             str(self.dir)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill torchrun and its ranks (which run in sessions of their own: killpg alone misses them)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rank_pids = set()
        for pid_file in self.dir.glob("pid*"):
            try:
                rank_pids.add(int(pid_file.read_text()))
            except ValueError:
                pass
        _kill_sessions(rank_pids)
        self.proc.wait()
        self.log.close()

    def stop(self, grace_s: float = 15.0) -> None:
        if self.alive():
            (self.dir / "stop").write_text("")
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, target: str, run_dir: Path, master_port: int, timeout: float, env: dict) -> tuple[int | None, int, float]:
        """Submit one body; wait for every rank's record, the pool's exit, or the timeout.

        Returns (rc, log offset where this job's output starts, elapsed): rc 0 when every rank wrote a
        record and the pool lives on, torchrun's exit code when it ended, None on timeout (pool killed).
        """
        self.log.flush()
        offset = self.log_path.stat().st_size
        job = {"target": target, "run_dir": str(run_dir), "master_port": master_port,
               "env": dict(env, MEGATRON_GRPO_POOL_OWNER=str(os.getpid()))}
        tmp = self.dir / f"job{self.jobs}.tmp"
        tmp.write_text(json.dumps(job))
        tmp.rename(self.dir / f"job{self.jobs}.json")
        self.jobs += 1
        started = time.monotonic()
        records = [run_dir / f"rank{r}.json" for r in range(self.world_size)]
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.kill()
                return rc, offset, time.monotonic() - started
            written = [p for p in records if p.exists()]
            if len(written) == self.world_size:
                if all(json.loads(p.read_text())["ok"] for p in written):
                    return 0, offset, time.monotonic() - started
            if any(not json.loads(p.read_text())["ok"] for p in written):
                # the failed rank exits; torchrun ends the others: wait for that, bounded
                try:
                    rc = self.proc.wait(timeout=max(1.0, min(120.0, timeout - (time.monotonic() - started))))
                except subprocess.TimeoutExpired:
                    rc = None
                self.kill()
                return rc, offset, time.monotonic() - started
            if time.monotonic() - started > timeout:
                self.kill()
                return None, offset, time.monotonic() - started
            time.sleep(POLL_S)


def _kill_sessions(sids: set) -> None:
    """SIGKILL every process of these sessions: the ranks (torchrun makes each a session leader) and
    what they started (dist_checkpointing's manager, multiprocessing's resource tracker)."""
    if not sids:
        return
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) in sids:  # state ppid pgrp session ...
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


_POOLS: dict[int, _Pool] = {}  # least recently used first
# Idle ranks hold ~0.7 GB each; with the three test streams of `make test` on 24 GB, keep at most this many
# pools (the least recently used one is stopped first).
MAX_POOLS = int(os.environ.get("MEGATRON_GRPO_DIST_MAX_POOLS", "2"))


def run_in_pool(world_size: int, cmd_prefix: list, env: dict, target: str, run_dir: Path, master_port: int,
                timeout: float) -> tuple[int | None, Path, int, float]:
    """Run ``target`` on the warm pool of ``world_size`` ranks (started on first use or after a failure).

    Returns (rc as in ``_Pool.run``, the pool's log, this job's offset in it, elapsed seconds).
    """
    pool = _POOLS.pop(world_size, None)
    if pool is None or not pool.alive():
        if pool is not None:  # failed or hung earlier: its error report has been read
            pool.kill()
            shutil.rmtree(pool.dir, ignore_errors=True)
        while len(_POOLS) >= max(1, MAX_POOLS):
            _POOLS.pop(next(iter(_POOLS))).stop()
        pool = _Pool(world_size, cmd_prefix, env)
    _POOLS[world_size] = pool  # now the most recently used
    rc, offset, elapsed = pool.run(target, run_dir, master_port, timeout, env)
    if rc != 0:
        _POOLS.pop(world_size, None)
        _ENDED.append(pool.dir)  # its log is the caller's error report: removed at exit
    return rc, pool.log_path, offset, elapsed


_ENDED: list[Path] = []  # folders of pools that failed or hung


def stop_all() -> None:
    for ws in list(_POOLS):
        _POOLS.pop(ws).stop()
    for folder in _ENDED:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(stop_all)


# ---- rank side -------------------------------------------------------------------------------------------

def _state_snapshot() -> dict:
    import torch

    return {"env": dict(os.environ), "cwd": os.getcwd(), "dtype": torch.get_default_dtype(),
            "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled()}


def _restore(snap: dict) -> None:
    """Undo what a body may leave behind: process groups, megatron's parallel state, cwd, torch knobs."""
    import gc

    import torch
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except ImportError:
        pass
    try:
        from megatron.core import num_microbatches_calculator as nmc

        nmc.destroy_num_microbatches_calculator()
    except (ImportError, AttributeError):
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
    os.chdir(snap["cwd"])
    torch.set_default_dtype(snap["dtype"])
    torch.set_num_threads(snap["threads"])
    torch.set_grad_enabled(snap["grad"])
    gc.collect()
    try:  # hand the body's freed heap back to the OS: an idle pool should hold little memory
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _owner_alive() -> bool:
    owner = int(os.environ.get("MEGATRON_GRPO_POOL_OWNER", "0") or 0)
    if not owner:
        return True
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def serve(pool_dir: Path, run_one) -> int:
    """Rank loop: run job0, job1, ... (``run_one(target, run_dir) -> bool``) until told to stop.

    Returns the exit code: 0 after a stop (or the owner's death), 1 after a failed body.
    """
    import torch

    rank = int(os.environ.get("RANK", "0"))
    (pool_dir / f"pid{rank}").write_text(str(os.getpid()))
    seed = torch.initial_seed()
    snap = _state_snapshot()
    launch_env = json.loads((pool_dir / "env.json").read_text())
    rank_env = {k: v for k, v in snap["env"].items() if launch_env.get(k) != v}  # what torchrun set per rank
    k, last_owner_check, idle_s = 0, time.monotonic(), 0.005
    while True:
        job_path = pool_dir / f"job{k}.json"
        if not job_path.exists():
            if (pool_dir / "stop").exists():
                return 0
            if time.monotonic() - last_owner_check > 2.0:
                if not _owner_alive():
                    return 0
                last_owner_check = time.monotonic()
            time.sleep(idle_s)
            idle_s = min(IDLE_POLL_MAX_S, idle_s * 1.5)
            continue
        idle_s = 0.005
        job = json.loads(job_path.read_text())
        k += 1
        os.environ.clear()  # the caller's environment of this call, as a fresh launch would see it
        os.environ.update({**job["env"], **rank_env, "MASTER_PORT": str(job["master_port"])})
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts this body's fresh store
        run_dir = Path(job["run_dir"])
        torch.manual_seed(seed)  # torch's start-up seed, as in a fresh process
        if not run_one(job["target"], run_dir):
            return 1
        if rank == 0:  # keep this body's store (hosted here) until every rank is through its body
            others = [run_dir / f"rank{r}.json" for r in range(1, int(os.environ.get("WORLD_SIZE", "1")))]
            # (the caller removes run_dir once it has read every rank's record: then all are through)
            while run_dir.exists() and not all(p.exists() for p in others):
                time.sleep(POLL_S)
        _restore(snap)
