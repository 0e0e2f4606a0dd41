"""Checkpoint directories: atomic commit, keep-last-K, auto-resume, RNG state, preemption signals.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/            a complete checkpoint (has COMPLETE)
        model/                megatron dist_checkpointing (model + optimizer), written by all ranks
        trainer_state.json    step, sampler, scheduler, weight version, metrics tail
        rng/rank_00000.pt     per-rank RNG states (tensors and ints only: loads with weights_only=True)
        MANIFEST.json         every file's size and checksum (trainer/manifest.py), written before COMPLETE
        COMPLETE              JSON marker written last, after every rank finished (step, layout, run id)
    step_00000012.partial/    being written (or left by a crash): never resumed from

A checkpoint becomes visible only by renaming ``.partial`` to its final name after a barrier, so a
kill at any moment leaves either the previous set of complete checkpoints or a new complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, corrupt): a user-facing input error."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def list_complete(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def marker_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def verify_checkpoint(path: Path, *, run_id: str | None = None) -> str | None:
    """None if ``path`` can be resumed from: marker, manifest (sizes, checksums), the files every
    resume reads, and -- when ``run_id`` is given -- written by that run. Else the reason, one line."""
    from megatron_grpo.trainer.manifest import verify_manifest

    if not is_complete(path):
        return f"incomplete or corrupt (no valid {MARKER} marker)"
    problem = verify_manifest(path)
    if problem is not None:
        return problem
    for required in ("trainer_state.json", "model"):
        if not (path / required).exists():
            return f"{required} is missing"
    other = marker_meta(path).get("run_id")
    if run_id is not None and other is not None and other != run_id:
        return f"written by another run ({other}, this folder's run is {run_id})"
    return None


def _warn(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[megatron-grpo] warning: {msg}", flush=True)


def resolve_resume(root: Path, resume: str, *, run_id: str | None = None,
                   skipped: list | None = None) -> Path | None:
    """`auto`: the newest checkpoint under root that verifies (None if there is none), saying which
    newer ones it skipped and why (also appended to ``skipped`` as (path, reason)); `none`; or a path
    or step number (``12``, ``step_00000012``: under root), which must verify (one-line CheckpointError)."""
    if resume == "none":
        return None
    if resume == "auto":
        for _, path in reversed(list_complete(root)):
            problem = verify_checkpoint(path, run_id=run_id)
            if problem is None:
                return _readable(path)
            _warn(f"skipping checkpoint {path}: {problem}")
            if skipped is not None:
                skipped.append((path, problem))
        return None
    path = Path(resume)
    step = re.fullmatch(r"(?:step_)?(\d+)", resume)
    if step and not path.is_dir():  # a step number (or step folder name) of this output folder's run
        path = root / step_dir_name(int(step.group(1)))
        if not path.is_dir():
            have = ", ".join(str(s) for s, _ in list_complete(root)) or "none"
            raise CheckpointError(f"checkpoint.resume={resume}: no checkpoint {path} (complete steps: {have})")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {path} is not a directory")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume: {path} cannot be resumed from: {problem}")
    return _readable(path)


def _readable(path: Path) -> Path:
    """A checkpoint of another megatron-core format is one clear line, before any model is built."""
    from megatron_grpo.models.ckpt_versions import META_KEY, check_readable

    written_by = json.loads((path / MARKER).read_text()).get(META_KEY)
    check_readable(path, path / "model", written_by, training=True, error=CheckpointError)
    return path


class CheckpointWriter:
    """Two-phase write used by every rank: ``begin`` -> (all ranks write) -> ``commit`` on rank 0."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, run_id: str | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.run_id = run_id  # recorded in every marker: resume never mixes two runs

    def partial_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".partial")

    def begin(self, step: int, *, is_writer: bool) -> Path:
        """Rank 0 prepares a fresh partial dir; call a barrier before other ranks write into it."""
        tmp = self.partial_dir(step)
        if is_writer:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, meta: dict) -> Path:
        """Rank 0, after a barrier: manifest, marker, atomic rename, prune old complete checkpoints."""
        from megatron_grpo.trainer.manifest import write_manifest

        tmp = self.partial_dir(step)
        final = self.root / step_dir_name(step)
        write_manifest(tmp, skip=(MARKER, MARKER + ".tmp"))
        marker_tmp = tmp / (MARKER + ".tmp")
        if self.run_id is not None:
            meta = {"run_id": self.run_id, **meta}
        marker_tmp.write_text(json.dumps({"step": step, **meta}))
        marker_tmp.replace(tmp / MARKER)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        tmp.replace(final)
        self._fsync_dir(self.root)
        self.prune(keep=final)
        return final

    def prune(self, keep: Path | None = None) -> None:
        complete = list_complete(self.root)
        excess = complete[: max(0, len(complete) - self.keep_last)] if self.keep_last > 0 else []
        for _, path in excess:
            if keep is None or path != keep:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- RNG state -------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG a step consumes: python, numpy, torch CPU (and CUDA), Megatron's tracker."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron_tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    except Exception:  # megatron not initialised in this process
        state["megatron_tracker"] = {}
    return state


def set_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(int(x) for x in py_state.tolist()), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and state["torch_cuda"]:
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if state.get("megatron_tracker"):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def save_rng(ckpt_dir: Path, rank: int) -> None:
    path = ckpt_dir / "rng" / f"rank_{rank:05d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path)


def load_rng(ckpt_dir: Path, rank: int) -> None:
    path = ckpt_dir / "rng" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no RNG state for rank {rank} (saved with a different world size?)")
    set_rng_state(torch.load(path, weights_only=True))


# ---- preemption --------------------------------------------------------------------------------

class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm preemption / time limit) or SIGINT (Ctrl-C, once: a second one
    interrupts); the loop checks it between steps, agrees on it across ranks, saves and exits cleanly."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop without waiting for the checkpoint
        self.received = signum

    @property
    def set(self) -> bool:
        return self.received is not None

    @staticmethod
    @contextmanager
    def children_immune():
        """Processes started inside (spawn/forkserver helpers) keep SIGTERM/SIGUSR1 blocked for life:
        Slurm signals every process of a job step, and a helper killed by it breaks the final save.
        Signals that arrive meanwhile stay pending for this process and are handled when the block ends.

        multiprocessing's resource tracker is started first, outside the block: starting it *unblocks*
        SIGINT/SIGTERM (``resource_tracker.ensure_running`` ends with SIG_UNBLOCK, not a restore), so
        a first start inside the block left every later helper -- dist_checkpointing's results-queue
        manager, the reward pool's forkserver -- killable by a group SIGTERM ("Broken pipe" after a save)."""
        _start_resource_tracker()
        sigs = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _start_resource_tracker() -> None:
    """Start (or check) multiprocessing's resource tracker now; it ignores SIGINT/SIGTERM itself."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    except (ImportError, OSError, AttributeError):  # no tracker on this platform: nothing unblocks either
        pass
