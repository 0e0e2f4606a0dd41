"""Resuming an older checkpoint of the folder's own run starts a new branch of that run: what the
abandoned branch wrote after that step is set aside, never deleted, before training continues.

Left in place, the abandoned branch's newer checkpoints would sit beside the new branch's (the next
``resume=auto`` would take them) and ``metrics.jsonl`` would silently drop its later lines. Instead
rank 0 moves them, after every start check has passed, into
``<output_dir>/abandoned_after_step_XXXXXXXX_<UTC time>/`` (``checkpoints/step_*``, and the
``metrics.jsonl`` / ``samples.jsonl`` lines of later steps), and prints one line saying so.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_grpo.trainer.checkpoint import _STEP_DIR

LOG_FILES = ("metrics.jsonl", "samples.jsonl")


def step_of(ckpt: Path) -> int | None:
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def newer_checkpoints(root: Path, step: int) -> list[Path]:
    """Checkpoint folders (complete or ``.partial``) of steps after ``step``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        s = step_of(child.with_name(child.name.removesuffix(".partial")))
        if s is not None and s > step and child.is_dir():
            found.append((s, child.name.endswith(".partial"), child))
    return [p for *_, p in sorted(found)]


def _later_lines(path: Path, step: int) -> tuple[list[str], list[str]]:
    """(kept, later): lines of a JSONL log with ``step`` <= / > the given step (cut lines are kept)."""
    kept, later = [], []
    if not path.is_file():
        return kept, later
    for line in path.read_text(errors="replace").splitlines():
        try:
            s = json.loads(line).get("step", -1)
        except (json.JSONDecodeError, AttributeError):
            s = -1
        (later if isinstance(s, int) and s > step else kept).append(line)
    return kept, later


def set_aside(out_dir: Path, step: int, *, log=print) -> Path | None:
    """Rank 0: move everything of the run after ``step`` into a new folder; one line says what moved."""
    out_dir = Path(out_dir)
    ckpts = newer_checkpoints(out_dir / "checkpoints", step)
    logs = {name: _later_lines(out_dir / name, step) for name in LOG_FILES}
    if not ckpts and not any(later for _, later in logs.values()):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out_dir / f"abandoned_after_step_{step:08d}_{stamp}"
    n = 1
    while dest.exists():  # two resumes within one second
        n += 1
        dest = out_dir / f"abandoned_after_step_{step:08d}_{stamp}_{n}"
    (dest / "checkpoints").mkdir(parents=True)
    for path in ckpts:
        path.replace(dest / "checkpoints" / path.name)
    moved = []
    for name, (kept, later) in logs.items():
        if not later:
            continue
        (dest / name).write_text("".join(line + "\n" for line in later))  # the copy first: nothing lost on a kill
        tmp = out_dir / (name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(out_dir / name)
        moved.append(f"{len(later)} {name} line(s)")
    what = ", ".join(([f"checkpoint(s) {', '.join(p.name for p in ckpts)}"] if ckpts else []) + moved)
    log(f"resuming step {step} of this run: its later work ({what}) moved to {dest}")
    return dest
