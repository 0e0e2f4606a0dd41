"""Helpers for end-to-end tests that run the real `megatron-grpo train` CLI as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "grpo_tiny_cpu.yaml"


def train_cmd(*overrides: str, nproc: int = 1, config: Path = CONFIG) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_grpo.cli", "train", "--config", str(config)]
    if nproc > 1:
        cmd.append(f"--nproc-per-node={nproc}")
    return cmd + list(overrides)


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_train(*overrides: str, nproc: int = 1, timeout: float = 600, config: Path = CONFIG) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*overrides, nproc=nproc, config=config), capture_output=True, text=True, cwd=REPO,
                          env=env(), timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def descendants(root_pid: int) -> list[int]:
    """All live descendants of a process (torchrun starts its workers in their own sessions, so a
    process-group kill does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(root_pid: int) -> None:
    """SIGKILL a process and every descendant: what `kill -9` of a whole job does."""
    import signal

    pids = descendants(root_pid) + [root_pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


SHM = Path("/dev/shm")


def kill9_at_step(cmd: list[str], run_dir: Path, kill_at: int) -> int:
    """Start ``cmd`` (a training run writing to ``run_dir``) in a session of its own, kill -9 its whole tree
    once step ``kill_at`` is logged, check that nothing of it survives, and return the step of the newest
    complete checkpoint it left."""
    import time

    import pytest

    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= kill_at for r in metrics(run_dir)):
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before step {kill_at}")
        time.sleep(0.2)
    kill_tree(proc.pid)
    proc.wait()
    time.sleep(1.0)  # let the kernel reap the workers before looking at what they left
    assert not descendants(proc.pid)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert saved, "no complete checkpoint before the kill"
    return int(saved[-1].split("_")[1])


def start_run(args, log_path: Path, nproc: int = 1, **extra_env: str) -> subprocess.Popen:
    """Start a training run in a process group (session) of its own, as a job step or a shell's foreground job
    is, so that ``os.killpg(proc.pid, sig)`` is what Slurm's scancel, `timeout` or Ctrl-C does. Output goes to
    ``log_path`` (a file, not a pipe nobody reads while waiting: it would block the run)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_cmd(*args, nproc=nproc), cwd=REPO, env={**env(), **extra_env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    return proc


def finish_run(proc: subprocess.Popen, timeout: float = 900) -> str:
    proc.wait(timeout=timeout)
    return proc.log_path.read_text()


def wait_for_run(proc: subprocess.Popen, ready, what: str, timeout: float = 1500) -> None:
    """Poll ``ready()`` while the run started by start_run goes on; fail with its log if it ends first."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what}:\n{proc.log_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)


def saved_step(log: str, signum: int) -> int:
    """The step whose checkpoint the run saved on preemption signal ``signum`` (the trainer's own line)."""
    import re

    found = re.search(rf"preemption signal {signum}: checkpoint of step (\d+) saved", log)
    assert found, log[-3000:]
    return int(found.group(1))


def shm_inodes(pids=None) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the /dev/shm files that these processes (None: every process) map, by
    name or under a name already gone (glibc maps a semaphore under its temporary name)."""
    found = set()
    for pid in pids if pids is not None else [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]:
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(f"{SHM}/"):
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                found.add((os.makedev(major, minor), int(parts[4])))
    return found


def shm_files(pids=None) -> set[str]:
    """Names in /dev/shm of the files these processes (None: every process) map."""
    inodes = shm_inodes(pids)
    names = set()
    for path in SHM.iterdir():
        try:
            st = path.lstat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            names.add(path.name)
    return names


def socket_files(pids) -> set[str]:
    """Paths of the Unix sockets these processes have bound (vLLM's ZMQ ``ipc://`` files among them):
    /proc/net/unix by the inodes of the processes' ``socket:[...]`` descriptors."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("/"):
            paths.add(parts[7])
    return paths


def leaked_shm(before: set[str]) -> list[str]:
    """Names in /dev/shm that were not in ``before`` and that no live process maps: left behind (what
    a killed vLLM engine leaves: its message queues ``psm_*`` and its lock ``sem.mp-*``)."""
    new = {p.name for p in SHM.iterdir()} - before
    return sorted(new - shm_files()) if new else []


def alive(pids) -> list[int]:
    """The processes among ``pids`` that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def prepare_tiny_assets(root: Path, config: Path = CONFIG) -> list[str]:
    """Synthetic data + the warm-started tiny model under ``root``, made through the trainer's own
    asset step; returns the ``model.path`` / ``data.path`` overrides that point a run at them."""
    from megatron_grpo.config import load_config
    from megatron_grpo.trainer.assets import prepare_assets

    overrides = [f"model.path={root / 'model'}", f"data.path={root / 'data'}"]
    prepare_assets(load_config(config, [*overrides, f"trainer.output_dir={root / 'unused'}"]))
    return overrides


def shm_names() -> set[str]:
    return {p.name for p in SHM.iterdir()}


def shm_left_after(before: set[str], wait: float = 20.0) -> list[str]:
    """``leaked_shm(before)`` once the engine guards had time to clean up (``wait`` seconds at most): the
    check of the ``no_shm_leak`` fixture, for a run made by a module-scoped fixture (which starts before
    any test's own ``no_shm_leak`` looks)."""
    import time

    deadline = time.monotonic() + wait
    while (left := leaked_shm(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


_CLI_DRIVER = r"""
import contextlib, io, json, sys, traceback
from megatron_grpo.cli import main
argvs, result_file, results = json.loads(sys.argv[1]), sys.argv[2], []
for argv in argvs:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["megatron-grpo", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # what `python -m megatron_grpo.cli` would exit with
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc(file=err)
            rc = 1
    results.append({"returncode": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
with open(result_file, "w") as fh:
    json.dump(results, fh)
"""


def cli_in_one_process(argvs: list[list[str]], result_file: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Each argv through the CLI's own entry (`megatron_grpo.cli.main`, with ``sys.argv`` set) one after the
    other in ONE fresh Python process: the heavy imports of the input checks (torch, transformers,
    datasets: ~11 CPU-s) are paid once instead of once per case. Returns what each would have exited with
    and printed."""
    proc = subprocess.run([sys.executable, "-c", _CLI_DRIVER, json.dumps(argvs), str(result_file)],
                          capture_output=True, text=True,
                          cwd=REPO, env=env(), timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        raise AssertionError(f"CLI driver failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return [subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(argvs, json.loads(result_file.read_text()))]


# The shared uninterrupted run (tests/conftest.py `plain_run`): 4 steps, a checkpoint every step, all kept.
PLAIN_RUN = ["trainer.eval_steps=0", "trainer.export_at_end=false", "trainer.samples_every=0",
             "checkpoint.save_steps=1", "checkpoint.keep_last=5", "trainer.max_steps=4"]
