"""One run per output folder: decide, before anything is written, whether this start continues the
folder's run, starts a new one, or must be refused.

``run.json`` names the folder's run (a random id); every checkpoint marker carries it. A start
with ``checkpoint.resume=none`` (or ``auto`` that finds nothing to resume) into a folder holding
another run's checkpoints or metrics is refused with one line, unless ``trainer.overwrite=true``,
which then removes that run's outputs (``auto`` still resumes a resumable run first) -- only once
every input check has passed
(:func:`start_run`, called on rank 0 right before the first write). ``auto`` resumes only checkpoints
of the folder's own run, so two runs are never mixed.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from megatron_grpo.trainer.checkpoint import (CheckpointError, list_complete, marker_meta, resolve_resume,
                                              _STEP_DIR)

RUN_FILE = "run.json"
# What a run writes directly under its output folder (export and eval files stay: they are results
# a user may have copied elsewhere already; the next run's export replaces export_hf atomically).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "tensorboard", RUN_FILE)


@dataclass
class RunPlan:
    out_dir: Path
    run_id: str
    resume_dir: Path | None
    clear: bool  # trainer.overwrite: remove the previous run's outputs before the first write
    new_run: bool
    aside_after: int | None = None  # explicit resume of an older step: set the later work aside (trainer/branch.py)


def read_run_id(out_dir: Path) -> str | None:
    try:
        return str(json.loads((Path(out_dir) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _previous_run(out_dir: Path) -> str | None:
    """What of another run the folder holds, as a phrase (None: nothing)."""
    found = []
    ckpts = out_dir / "checkpoints"
    if ckpts.is_dir():
        steps = [p for p in ckpts.iterdir() if _STEP_DIR.match(p.name.removesuffix(".partial"))]
        if steps:
            found.append(f"{len(steps)} checkpoint folder(s)")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        lines = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        found.append(f"metrics.jsonl with {lines} line(s)")
    return " and ".join(found) or None


def plan_run(cfg, *, skipped: list | None = None) -> RunPlan:
    """Read-only: every rank computes the same plan from the same files. Raises CheckpointError."""
    out_dir = Path(cfg.trainer.output_dir)
    root = out_dir / "checkpoints"
    overwrite = bool(cfg.trainer.get("overwrite", False))
    resume = str(cfg.checkpoint.resume)
    folder_run = read_run_id(out_dir)
    previous = _previous_run(out_dir) if out_dir.is_dir() else None
    skipped = [] if skipped is None else skipped

    resume_dir = None
    if resume == "auto":  # overwrite never discards a resumable run of this folder (requeues keep it set)
        resume_dir = resolve_resume(root, "auto", run_id=folder_run, skipped=skipped)
    elif resume not in ("auto", "none"):
        resume_dir = resolve_resume(root, resume)
    if resume_dir is not None:
        ckpt_run = marker_meta(resume_dir).get("run_id")
        same = resume_dir.resolve().parent == root.resolve() or (ckpt_run is not None and ckpt_run == folder_run)
        if same or previous is None or overwrite:
            run_id = (folder_run or ckpt_run or uuid.uuid4().hex[:12]) if same else uuid.uuid4().hex[:12]
            return RunPlan(out_dir, run_id, resume_dir, clear=overwrite and not same and previous is not None,
                           new_run=not same, aside_after=_branch_point(root, resume_dir) if same and resume != "auto" else None)
        raise CheckpointError(_refusal(out_dir, previous, f"resuming {resume_dir} (another run) into it would "
                                                         "mix two runs"))
    if previous is not None and not overwrite:
        if skipped:
            why = f"no checkpoint there can be resumed from (newest: {skipped[0][0].name}: {skipped[0][1]})"
        elif resume == "auto" and folder_run is not None and not (root.is_dir() and any(root.iterdir())):
            # the folder's own run stopped before its first checkpoint: start it again from step 0
            return RunPlan(out_dir, folder_run, None, clear=True, new_run=False)
        else:
            why = f"checkpoint.resume={resume} would start a new run over it"
        raise CheckpointError(_refusal(out_dir, previous, why))
    return RunPlan(out_dir, uuid.uuid4().hex[:12], None, clear=previous is not None, new_run=True)


def _branch_point(root: Path, resume_dir: Path) -> int | None:
    """The resumed step if this run has a complete checkpoint after it (an older one resumed), else None."""
    from megatron_grpo.trainer.branch import step_of

    step = marker_meta(resume_dir).get("step", step_of(resume_dir))
    return step if isinstance(step, int) and any(s > step for s, _ in list_complete(root)) else None


def _refusal(out_dir: Path, previous: str, why: str) -> str:
    return (f"trainer.output_dir: {out_dir} holds another run ({previous}); {why}. Use a new "
            f"trainer.output_dir, or trainer.overwrite=true to replace that run")


def start_run(plan: RunPlan) -> None:
    """Rank 0, after every check and build has passed: clear what overwrite replaces, write run.json."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if plan.clear:
        for name in RUN_OUTPUTS:
            path = plan.out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if plan.aside_after is not None:
        from megatron_grpo.trainer.branch import set_aside

        set_aside(plan.out_dir, plan.aside_after, log=lambda m: print(f"[megatron-grpo] {m}", flush=True))
    path = plan.out_dir / RUN_FILE
    if read_run_id(plan.out_dir) != plan.run_id:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": plan.run_id}) + "\n")
        tmp.replace(path)
