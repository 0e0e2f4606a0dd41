"""Run a function under torchrun from a test, and turn rank failures and hangs into clear errors.

``run_distributed("tests.dist.bodies:train_tp2pp2", world_size=4)`` launches
``python -m torch.distributed.run --nproc-per-node 4 -m megatron_grpo.testing.torchrun_worker ...``.
Each rank imports the target, calls it with ``kwargs`` and writes its return value (JSON) or its
traceback to a per-rank file. The caller gets the list of per-rank return values, or an
AssertionError that shows every failed rank's traceback and the tail of the combined log. A run that
exceeds ``timeout`` is killed as a process group and reported as a hang with the ranks that had
finished.

Launches are expensive on 2 cores (imports of megatron-core/vLLM cost 10-40 s), so tests group many
assertions into one body.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_grpo.distributed.ports import free_port
from megatron_grpo.testing import torchrun_pool

DEFAULT_TIMEOUT = float(os.environ.get("MEGATRON_GRPO_DIST_TIMEOUT", "600"))


def _tail(path: Path, n_chars: int = 6000, offset: int = 0) -> str:
    try:
        text = path.read_bytes()[offset:].decode(errors="replace")
    except OSError:
        return "<no log>"
    return text[-n_chars:]


def run_distributed(
    target: str,
    world_size: int,
    *,
    kwargs: dict | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict | None = None,
    workdir: str | os.PathLike | None = None,
    warm: bool = False,
) -> list:
    """Run ``module:function`` on ``world_size`` ranks; return each rank's JSON-able result.

    ``warm``: run it on this process's warm pool of ``world_size`` ranks (one torchrun launch serves
    many bodies; see :mod:`megatron_grpo.testing.torchrun_pool`) -- for bodies that set up and tear down
    their own process groups; calls with their own ``env`` always launch fresh.
    Raises AssertionError naming each failed rank (with its traceback), or the hang.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="torchrun-", dir=workdir))
    log_path = run_dir / "combined.log"
    (run_dir / "kwargs.json").write_text(json.dumps(kwargs or {}))
    prefix = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={world_size}", "--nnodes=1", "--max-restarts=0",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
    ]
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": full_env.get("OMP_NUM_THREADS", "1")})
    full_env.update(env or {})
    repo_root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, full_env.get("PYTHONPATH")) if p)
    offset = 0
    if warm and not env and torchrun_pool.enabled():
        rc, log_path, offset, elapsed = torchrun_pool.run_in_pool(
            world_size, prefix, full_env, target, run_dir, free_port(), timeout)
    else:
        rc, elapsed = _launch([*prefix, f"--log-dir={run_dir / 'elastic'}", "-m", "megatron_grpo.testing.torchrun_worker",
                               target, str(run_dir)], full_env, log_path, timeout)

    results, failures, missing = [], [], []
    for rank in range(world_size):
        path = run_dir / f"rank{rank}.json"
        if not path.exists():
            missing.append(rank)
            results.append(None)
            continue
        record = json.loads(path.read_text())
        if record["ok"]:
            results.append(record["result"])
        else:
            failures.append(f"--- rank {rank} failed:\n{record['traceback']}")
            results.append(None)

    if rc is None or rc != 0 or failures or missing:
        what = (f"hung: killed after {timeout:.0f}s" if rc is None
                else f"failed (torchrun exit {rc}, {elapsed:.0f}s)")
        raise AssertionError(
            f"{target} at world size {world_size} {what}; ranks without a result: {missing}\n"
            + "\n".join(failures) + f"\n--- log tail:\n{_tail(log_path, offset=offset)}"
            + f"\n--- kept: {run_dir}"
        )
    shutil.rmtree(run_dir, ignore_errors=True)  # kept only when the call failed
    return results


def _launch(cmd: list, env: dict, log_path: Path, timeout: float) -> tuple[int | None, float]:
    """One fresh torchrun launch: (its exit code, or None when killed after ``timeout``; seconds)."""
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - started
