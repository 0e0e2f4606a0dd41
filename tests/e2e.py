"""Helpers for end-to-end tests that run the real `megatron-grpo train` CLI as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "grpo_tiny_cpu.yaml"


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_grpo.cli", "train", "--config", str(CONFIG)]
    if nproc > 1:
        cmd.append(f"--nproc-per-node={nproc}")
    return cmd + list(overrides)


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_train(*overrides: str, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*overrides, nproc=nproc), capture_output=True, text=True, cwd=REPO,
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


def prepare_tiny_assets(root: Path) -> list[str]:
    """Synthetic data + the warm-started tiny model under ``root``, made through the trainer's own
    asset step; returns the ``model.path`` / ``data.path`` overrides that point a run at them."""
    from megatron_grpo.config import load_config
    from megatron_grpo.trainer.assets import prepare_assets

    overrides = [f"model.path={root / 'model'}", f"data.path={root / 'data'}"]
    prepare_assets(load_config(CONFIG, [*overrides, f"trainer.output_dir={root / 'unused'}"]))
    return overrides
