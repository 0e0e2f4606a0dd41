"""A watcher that keeps a vLLM engine in its own processes from outliving its owner or leaking /dev/shm.

``start_engine`` (in-job disaggregated engine, rollout servers) runs vLLM's engine core and workers
in processes of their own. They create POSIX shared memory: shm_broadcast's message queues
(``/dev/shm/psm_*``, 160-240 MiB each on CPU) and a multiprocessing lock (``/dev/shm/sem.mp-*``).
vLLM's shutdown removes them, and Python's resource tracker removes them when their processes die,
but two ways of dying defeat both (both seen on this machine, both on users' nodes, where /dev/shm
is RAM held until reboot):

* the owner alone is SIGKILLed (the OOM killer, a kill -9 of one rank): vLLM's engine core does not
  notice that its client is gone; it and its workers run on as orphans, holding their memory (on
  CUDA their GPUs) and their names, for ever;
* the owner's whole process group or tree is SIGKILLed (torchrun's SIGKILL after a peer rank failed
  is a killpg; a kill -9 of a job): the resource tracker dies too and nothing removes the names.

The guard is a small stdlib-only process started as soon as the engine is up, detached from the
owner's process group and tree (new session, double fork), so kills aimed at those do not reach it.
It records the engine's processes (pid and start time) and the /dev/shm files they map (name, device
and inode; found by inode, so that a semaphore, mapped under glibc's temporary name, counts), then waits until the owner exits or calls :meth:`EngineGuard.release` (after vLLM's own
shutdown). Then it gives the engine's processes a few seconds to end, SIGKILLs those still running
(only a pid whose start time matches: never a reused pid), and removes the recorded files still
present with the same device and inode: only files this engine's processes mapped, never another
run's (nor files its owner maps itself). It also removes the engine's private socket folder (vLLM's ZMQ
``ipc://`` files, see ``disaggregated.private_ipc_dir``): a killed process never unlinks its sockets,
and a run's end skips the interpreter's teardown (``lifetime``), so they would pile up in /tmp.
With nothing left over it does nothing and says nothing.

The trainer uses the same guard for its own helper processes (the reward pool, dist_checkpointing's
results queue; ``trainer/loop.py``), which are started immune to Slurm's signals and would otherwise
outlive a killed rank.

Not covered: a kill of every process of a cgroup (Slurm's proctrack/cgroup when a step's KillWait
ends) takes the guard too; there Slurm's job_container/tmpfs (a private /dev/shm per job) cleans up.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

SHM_DIR = "/dev/shm"
POLL_S = 0.5  # how often the guard checks that its owner is alive
GRACE_S = 5.0  # how long the engine's processes get to end on their own once the owner is done


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, ...; start time is [19])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def running(pid: int, start: int) -> bool:
    """The process that had this start time is still running (not gone, not a zombie, pid not reused)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == start


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def mapped_shm(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the /dev/shm files a process maps, by name or not: a named semaphore is
    mapped under the temporary name glibc created it with ("/dev/shm/sem.XXXXXX (deleted)")."""
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(SHM_DIR + "/"):
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            found.add((os.makedev(major, minor), int(parts[4])))
    return found


def shm_names(inodes: set[tuple[int, int]]) -> dict[str, list[int]]:
    """The names in /dev/shm of these files: name -> [st_dev, st_ino]."""
    names = {}
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return names
    for name in entries:
        try:
            st = os.lstat(os.path.join(SHM_DIR, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            names[name] = [st.st_dev, st.st_ino]
    return names


def engine_processes(worker_pids, owner: int | None = None) -> list[int]:
    """The engine's processes: each worker, its ancestors below the owner (the engine core), and
    their descendants. A worker that is not the owner's descendant (another host) is left out."""
    owner = os.getpid() if owner is None else owner
    found: set[int] = set()
    for pid in worker_pids:
        chain, p = [], int(pid)
        while p > 1 and p != owner:
            chain.append(p)
            fields = _stat(p)
            p = int(fields[1]) if fields else 0
        if p == owner:
            found.update(chain)
    for pid in list(found):
        found.update(descendants(pid))
    found.discard(owner)
    return sorted(found)


class EngineGuard:
    """The owner's handle on its guard process."""

    def __init__(self, pid: int, release_fd: int):
        self.pid, self._fd = pid, release_fd

    @classmethod
    def start(cls, engine_pids, dirs=()) -> "EngineGuard":
        owner = os.getpid()
        procs = [[p, s] for p in engine_pids if (s := start_time(p)) is not None]
        mine = mapped_shm(owner)
        theirs = set().union(*(mapped_shm(pid) for pid, _ in procs)) - mine
        record = {"owner": [owner, start_time(owner)], "procs": procs, "exclude": sorted(mine),
                  "files": shm_names(theirs), "dirs": [os.path.abspath(d) for d in dirs]}
        r, w = os.pipe()
        try:
            record["fd"] = r
            proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=None, pass_fds=(r,), start_new_session=True,
                                    cwd="/")
            out, _ = proc.communicate(json.dumps(record).encode(), timeout=60)
            if proc.returncode != 0 or not out.strip().isdigit():
                raise RuntimeError(f"engine guard did not start (exit {proc.returncode})")
        except BaseException:
            os.close(w)  # not a release: a guard that did start watches on until this process is gone
            raise
        finally:
            os.close(r)
        return cls(int(out), w)

    def release(self) -> None:
        """The engine has been shut down: the guard checks that nothing is left, then exits."""
        if self._fd is not None:
            try:
                os.write(self._fd, b"x")
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def start_guard(find_pids, what: str, dirs=()) -> EngineGuard | None:
    """A guard over the processes ``find_pids()`` returns (and the folders ``dirs``, removed once they
    are gone), or None with a warning: the guard is a safety net, a run without it still works
    (``what`` names them in the warning)."""
    import logging

    try:
        return EngineGuard.start(find_pids(), dirs)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        logging.getLogger(__name__).warning(
            "%s started without a guard process (%s): if this process is SIGKILLed, they and their /dev/shm "
            "files may be left behind", what, e)
        return None


# ---- the guard process -----------------------------------------------------------------------------

def _wait_for_owner(record: dict) -> None:
    """Until the owner releases its engine or is gone. Only an explicit release counts: the pipe may
    also close while the owner runs on (its handle was dropped after an error), and then the owner's
    death is what ends the wait."""
    owner, owner_start = record["owner"]
    fds = [record["fd"]]
    while running(owner, owner_start):
        ready, _, _ = select.select(fds, [], [], POLL_S)
        if ready:
            if os.read(fds[0], 1):
                return
            fds = []  # closed without a release


def _clean(record: dict) -> tuple[list[int], list[str]]:
    """Kill what is left of the engine, then remove its /dev/shm files and folders; (killed pids, removed
    /dev/shm names). The folders (private socket folders) go silently: they hold no memory."""
    procs = [(p, s) for p, s in record["procs"]]
    files = dict(record["files"])
    exclude = {tuple(x) for x in record["exclude"]}
    later = set().union(*(mapped_shm(p) for p, s in procs if running(p, s))) - exclude
    files.update(shm_names(later))  # segments made after the record was taken
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(running(p, s) for p, s in procs):
        time.sleep(0.1)
    killed = []
    for pid, start in procs:
        if running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(running(p, s) for p, s in procs):
        time.sleep(0.1)
    if killed:  # a resource tracker that outlived the owner now removes what it knows of: let it go first
        time.sleep(1.0)
    removed = []
    for name, (dev, ino) in sorted(files.items()):
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
    for folder in record.get("dirs", []):
        shutil.rmtree(folder, ignore_errors=True)
    return killed, removed


def _guard_main() -> int:
    record = json.loads(sys.stdin.buffer.read())
    if os.fork():  # the launcher exits at once: the guard is nobody's child in the owner's tree
        os._exit(0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # the owner reads our pid up to EOF
    os.close(null)
    _wait_for_owner(record)
    killed, removed = _clean(record)
    if killed or removed:
        owner = record["owner"][0]
        said = [f"SIGKILLed {len(killed)} leftover process(es) {killed}"] if killed else []
        said += [f"removed {len(removed)} leftover file(s) from {SHM_DIR}: {' '.join(removed)}"] if removed else []
        why = "is gone" if not running(*record["owner"]) else "released its engine"
        try:
            print(f"[megatron-grpo engine guard] owner pid {owner} {why}: {'; '.join(said)}", file=sys.stderr, flush=True)
        except OSError:  # the owner's stderr is gone with it
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_guard_main())
