"""Save and restore everything a GRPO step depends on, so a resumed run continues bit for bit.

Model and optimizer go through megatron-core dist_checkpointing (every rank writes its shards;
both reload at another TP/PP/DP: the model's sharded tensors and the distributed optimizer's
fully-sharded model-space format are resharded on load). Exact continuation needs the same layout:
at another layout the per-rank RNG states do not map onto the new ranks and are re-seeded from
(seed, step, rank); the sampler and rollout seeds are global, so prompts and sampling seeds continue. The LR scheduler, sampler position, step counters and
weight version go to ``trainer_state.json`` (rank 0); RNG states per rank. The directory protocol
(``.partial`` -> COMPLETE -> rename) is in ``checkpoint.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megatron_grpo.models.loader import unwrap_model
from megatron_grpo.trainer.checkpoint import CheckpointError, CheckpointWriter, load_rng, save_rng

STATE_FILE = "trainer_state.json"


def _sharded(model_chunks, optimizer, *, is_loading: bool) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("checkpointing several model chunks per rank (virtual PP) is not supported")
    sd = {"model": unwrap_model(model_chunks[0]).sharded_state_dict()}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, **_optimizer_format(optimizer))
    return sd


# The distributed optimizer's checkpoint format: megatron-core's default in 0.16 ("fully_sharded_model_space")
# cannot even be saved there ("ShardedTensor.flattened_range is not supported"); "fully_reshardable" stores the
# canonical per-parameter state (gathered on DP rank 0 at save), which loads at any TP/PP/DP.
DISTOPT_FORMAT = "fully_reshardable"


def _optimizer_format(optimizer) -> dict:
    import inspect

    try:
        params = inspect.signature(optimizer.sharded_state_dict).parameters
    except (TypeError, ValueError):
        return {}
    takes = "metadata" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())  # ChainedOptimizer: **kwargs
    return {"metadata": {"distrib_optim_sharding_type": DISTOPT_FORMAT}} if takes else {}


def save_training_state(writer: CheckpointWriter, step: int, *, model_chunks, optimizer, scheduler,
                        trainer_state: dict, meta: dict) -> Path:
    """Collective. Returns the committed checkpoint directory. SIGTERM/SIGUSR1/SIGINT stay blocked
    meanwhile: dist_checkpointing forks writer processes per save, and a group signal (scancel,
    timeout, Ctrl-C) killed them mid-write ("Broken pipe"); the signal is handled once the save is done."""
    from megatron_grpo.trainer.checkpoint import PreemptionFlag

    with PreemptionFlag.children_immune():
        return _save_training_state(writer, step, model_chunks=model_chunks, optimizer=optimizer,
                                    scheduler=scheduler, trainer_state=trainer_state, meta=meta)


def _save_training_state(writer, step, *, model_chunks, optimizer, scheduler, trainer_state, meta) -> Path:
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    tmp = writer.begin(step, is_writer=rank == 0)
    if rank == 0:
        (tmp / "model").mkdir()
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict=_sharded(model_chunks, optimizer, is_loading=False),
                            checkpoint_dir=str(tmp / "model"))
    save_rng(tmp, rank)
    if rank == 0:
        state = dict(trainer_state, step=step,
                     scheduler=scheduler.state_dict() if scheduler is not None else None)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    dist.barrier()
    final = writer.commit(step, meta) if rank == 0 else writer.root / tmp.name.removesuffix(".partial")
    dist.barrier()
    return final


def current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _layout_text(layout: dict) -> str:
    return " ".join(f"{k}={layout.get(k)}" for k in ("tp", "pp", "dp"))


def _reseed(seed: int, step: int) -> None:
    """Fresh RNG streams for a resume at another layout: distinct per rank, reproducible per (seed, step)."""
    import random

    import numpy as np
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    base = (seed * 1_000_003 + step * 7919) % (2**31)
    rank = dist.get_rank()
    random.seed(base + rank)
    np.random.seed((base + rank) % (2**32))
    torch.manual_seed(base + rank)
    model_parallel_cuda_manual_seed(base)


def load_training_state(ckpt_dir: Path, *, model_chunks, optimizer, scheduler, seed: int = 1234) -> dict:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns trainer_state.
    A checkpoint from another layout is resharded (RNG re-seeded, said once); what megatron-core
    cannot load is a CheckpointError naming both layouts (reported by every rank, see cli.py)."""
    from megatron.core import dist_checkpointing

    from megatron_grpo.trainer.checkpoint import marker_meta

    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file() or not (ckpt_dir / "model").is_dir():
        raise CheckpointError(f"{ckpt_dir}: missing {STATE_FILE} or model/ (corrupt checkpoint)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e.msg})") from None
    now, meta = current_layout(), marker_meta(ckpt_dir)
    saved = {k: meta.get(k, now[k]) for k in now}
    try:
        loaded = dist_checkpointing.load(sharded_state_dict=_sharded(model_chunks, optimizer, is_loading=True),
                                         checkpoint_dir=str(ckpt_dir / "model"))
        unwrap_model(model_chunks[0]).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    except Exception as e:  # megatron-core's own exceptions: one line, on the rank that hit it
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt_dir}: cannot load the model/optimizer written at {_layout_text(saved)} "
                              f"at {_layout_text(now)}: {type(e).__name__}: {text[0][:300] if text else ''}") from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if saved == now:
        load_rng(ckpt_dir, dist.get_rank())
    else:
        _reseed(seed, int(state.get("step", 0)))
        if dist.get_rank() == 0:
            print(f"[megatron-grpo] checkpoint written at {_layout_text(saved)}, resumed at {_layout_text(now)}: "
                  "model and optimizer resharded; RNG re-seeded (not a bit-exact continuation)", flush=True)
    return state
