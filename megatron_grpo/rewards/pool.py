"""Worker processes that run reward calls with a hard timeout enforced from outside.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one hung task -- a worker stuck in
C code (a sympy power with a huge exponent ignores math-verify's signal.alarm) would block it, and
killing the process breaks the whole executor. Here every worker has its own pipe; the parent waits
on all pipes with the earliest deadline, SIGKILLs a worker that runs past its task's deadline and
starts a replacement. Workers run each call on their main thread, so math-verify's own signal-based
timeouts work there too.

Start method: "forkserver" by default (falls back to "spawn"): the caller may be a torchrun rank with
torch and threads loaded, where plain fork is unsafe. The fork server preloads math-verify, so
replacing a killed worker costs milliseconds, not a fresh interpreter. Workers do not re-import the
caller's ``__main__`` (multiprocessing's default): a trainer script importing torch, megatron and
vLLM would cost every worker seconds and hundreds of MB. Rewards must therefore live in importable
modules -- which the plugin path ``pkg.module:function`` requires anyway.
"""
from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_connections
from typing import Any

from megatron_grpo.lifetime import set_parent_death_signal
from megatron_grpo.rewards.registry import ResolvedReward

PRELOAD_MODULES = ["megatron_grpo.rewards.registry", "math_verify", "sympy"]
_STOP = None
_READY = -1
STARTUP_TIMEOUT_S = 120.0


@dataclass
class RewardTask:
    """One reward call on a slice of the batch. stage: "call" or "per_sample" (staged rewards)."""

    reward: str
    stage: str
    completions: list
    solutions: list | None
    kwargs: dict
    timeout_s: float


@dataclass
class TaskOutcome:
    """status "ok" (values set), "error" (message set) or "timeout"."""

    status: str
    values: list | None = None
    message: str = ""


@dataclass
class _Worker:
    process: Any
    conn: Any
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


def run_reward_call(reward: Any, task: RewardTask) -> list:
    """Invoke one reward stage on a task's slice (shared by workers and in-process mode)."""
    if task.stage == "per_sample":
        values = reward.per_sample(task.completions, solutions=task.solutions, **task.kwargs)
    else:
        values = reward(task.completions, solutions=task.solutions, **task.kwargs)
    values = list(values)
    if len(values) != len(task.completions):
        raise ValueError(f"returned {len(values)} values for {len(task.completions)} completions")
    return values


def _warm_up_math_verify() -> None:
    """math-verify sets up its LaTeX parsing on the first parse/verify (~0.2 CPU-s, 25x a later call; seconds
    on a loaded node): do it before "ready", so a sample's timeout never pays for it."""
    try:
        from math_verify import parse, verify

        verify(parse("$1$"), parse("\\boxed{1}"))
    except Exception:  # not installed, or a math-verify without these: the rewards report their own errors
        pass


def _worker_main(conn: Any, rewards: dict[str, ResolvedReward]) -> None:
    """Worker loop: build the rewards once, then answer (task_id, task) messages until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer; it closes us
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # so do scancel/timeout's group signals: the trainer still needs
        signal.signal(sig, signal.SIG_IGN)        # us for its last step; a fork server's child misses the caller's mask
    set_parent_death_signal()  # Linux: SIGKILL this worker when its parent (the fork server, or the caller) dies
    for module in PRELOAD_MODULES:  # no-op under the fork server; under spawn, before "ready"
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    built: dict[str, Any] = {}
    build_errors: dict[str, str] = {}
    for name, resolved in rewards.items():
        try:
            built[name] = resolved.instantiate()
        except BaseException as exc:  # reported on every call of that reward
            build_errors[name] = f"{type(exc).__name__}: {exc}"
    _warm_up_math_verify()
    conn.send((_READY, None))  # start-up (imports, building, first-parse set-up) must not eat a task's timeout
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is _STOP:
            return
        task_id, task = message
        try:
            if task.reward in build_errors:
                raise RuntimeError(f"could not build reward in worker: {build_errors[task.reward]}")
            reply = (task_id, TaskOutcome("ok", values=run_reward_call(built[task.reward], task)))
        except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
            reply = (task_id, TaskOutcome("error", message=f"{type(exc).__name__}: {exc}"))
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. values that do not pickle
            conn.send((task_id, TaskOutcome("error", message=f"result not sendable: {exc}")))


@contextlib.contextmanager
def _main_module_hidden():
    """Hide ``__main__``'s file and spec while a worker starts, so multiprocessing's preparation data
    does not tell the child to re-run the caller's main module."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__.update(saved)


def _mp_context(name: str):
    if name == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD_MODULES)
        return context
    if name not in ("forkserver", "spawn"):
        raise ValueError(f"mp_context must be 'forkserver' or 'spawn' (fork is unsafe in a torch process), got {name!r}")
    return multiprocessing.get_context("spawn")


class RewardWorkerPool:
    """A fixed number of reward worker processes; num_workers=0 runs calls in-process (no timeout)."""

    def __init__(self, rewards: dict[str, ResolvedReward], *, num_workers: int, mp_context: str = "forkserver"):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._rewards = rewards
        self._context = _mp_context(mp_context) if num_workers else None
        self._workers: list[_Worker] = []
        self._in_process: dict[str, Any] = {}
        self.workers_replaced = 0
        self._startup_failures = 0
        self._closed = False
        if num_workers == 0:
            self._in_process = {name: r.instantiate() for name, r in rewards.items()}
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._rewards), name="reward-worker", daemon=True
        )
        with _main_module_hidden():
            process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _replace(self, index: int) -> None:
        """SIGKILL worker ``index`` (hung or dead) and start a fresh one in its slot."""
        worker = self._workers[index]
        _kill(worker)
        self._workers[index] = self._start_worker()
        self.workers_replaced += 1

    def run(self, tasks: list[RewardTask]) -> list[TaskOutcome]:
        """Run all tasks, at most one per worker at a time; returns one outcome per task, in order.

        A task's deadline starts when it is handed to a worker that has finished starting up."""
        if self._closed:
            raise RuntimeError("the reward worker pool is closed")
        if not self._workers:
            return [self._run_in_process(task) for task in tasks]
        outcomes: list[TaskOutcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        running: dict[int, tuple[int, float]] = {}  # worker slot -> (task index, deadline)
        while pending or running:
            for slot, worker in enumerate(self._workers):
                if pending and worker.ready and slot not in running and self._send(slot, pending[0], tasks[pending[0]]):
                    index = pending.popleft()
                    running[slot] = (index, time.monotonic() + tasks[index].timeout_s)
            starting = [slot for slot, w in enumerate(self._workers) if not w.ready]
            deadlines = [d for _, d in running.values()] + [self._workers[s].started + STARTUP_TIMEOUT_S for s in starting]
            conns = {self._workers[slot].conn: slot for slot in list(running) + starting}
            ready = wait_for_connections(list(conns), timeout=max(0.0, min(deadlines) - time.monotonic()))
            for conn in ready:
                slot = conns[conn]
                try:
                    task_id, outcome = conn.recv()
                except (EOFError, OSError):
                    code = self._workers[slot].process.exitcode
                    if slot in running:
                        outcomes[running.pop(slot)[0]] = TaskOutcome("error", message=f"reward worker died (exit code {code})")
                    else:
                        self._note_startup_failure(f"exit code {code}")
                    self._replace(slot)
                    continue
                if task_id == _READY:
                    self._workers[slot].ready = True
                    self._startup_failures = 0
                else:
                    index, _ = running.pop(slot)
                    assert task_id == index, (task_id, index)
                    outcomes[index] = outcome
            now = time.monotonic()
            for slot, (index, deadline) in list(running.items()):
                if now >= deadline:
                    running.pop(slot)
                    outcomes[index] = TaskOutcome("timeout", message=f"no result after {tasks[index].timeout_s:g}s")
                    self._replace(slot)
            for slot in starting:
                worker = self._workers[slot]
                if not worker.ready and now >= worker.started + STARTUP_TIMEOUT_S:
                    self._note_startup_failure(f"not ready after {STARTUP_TIMEOUT_S:g}s")
                    self._replace(slot)
        return outcomes  # type: ignore[return-value]

    def _note_startup_failure(self, reason: str) -> None:
        """Give up (instead of respawning forever) when workers keep dying before they are ready."""
        self._startup_failures += 1
        if self._startup_failures > 3 * len(self._workers):
            raise RuntimeError(f"reward workers keep failing to start ({reason}); see their stderr")

    def _send(self, slot: int, index: int, task: RewardTask) -> bool:
        try:
            self._workers[slot].conn.send((index, task))
            return True
        except (BrokenPipeError, EOFError, OSError):
            self._replace(slot)
            return False

    def _run_in_process(self, task: RewardTask) -> TaskOutcome:
        try:
            return TaskOutcome("ok", values=run_reward_call(self._in_process[task.reward], task))
        except Exception as exc:
            return TaskOutcome("error", message=f"{type(exc).__name__}: {exc}")

    def close(self, *, grace_s: float = 2.0) -> None:
        """Ask workers to stop, then kill any that have not within grace_s. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(_STOP)
            except Exception:
                pass
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            _kill(worker)
        self._workers = []


def _kill(worker: _Worker) -> None:
    if worker.process.is_alive():
        try:
            os.kill(worker.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.process.join(timeout=5.0)
    try:
        worker.conn.close()
    except Exception:
        pass
    try:
        worker.process.close()
    except ValueError:  # still running after SIGKILL + 5 s: leave it to the OS
        pass
