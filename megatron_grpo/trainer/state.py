"""Save and restore everything a GRPO step depends on, so a resumed run continues bit for bit.

Model and optimizer go through megatron-core dist_checkpointing (every rank writes its shards;
reloadable at another TP/PP for the model). The LR scheduler, sampler position, step counters and
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
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, **_optimizer_metadata(optimizer))
    return sd


def _optimizer_metadata(optimizer) -> dict:
    """The distributed optimizer's checkpoint format: megatron-core's default ('fully_sharded_model_space',
    deprecated) raises "ShardedTensor.flattened_range is not supported" on save in 0.16. 'dp_reshardable'
    keeps the TP x PP structure fixed (a resume at the same layout; the model itself reshards). Save and
    load use the same one."""
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if not any(isinstance(o, DistributedOptimizer) for o in parts):
        return {}  # the plain optimizer's checkpoints stay exactly as before
    if not any(p.kind == p.VAR_KEYWORD or p.name == "metadata"
               for p in inspect.signature(optimizer.sharded_state_dict).parameters.values()):
        return {}
    return {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}


def save_training_state(writer: CheckpointWriter, step: int, *, model_chunks, optimizer, scheduler,
                        trainer_state: dict, meta: dict) -> Path:
    """Collective. Returns the committed checkpoint directory."""
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


def load_training_state(ckpt_dir: Path, *, model_chunks, optimizer, scheduler) -> dict:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns trainer_state."""
    from megatron.core import dist_checkpointing

    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file() or not (ckpt_dir / "model").is_dir():
        raise CheckpointError(f"{ckpt_dir}: missing {STATE_FILE} or model/ (corrupt checkpoint)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e.msg})") from None
    loaded = dist_checkpointing.load(sharded_state_dict=_sharded(model_chunks, optimizer, is_loading=True),
                                     checkpoint_dir=str(ckpt_dir / "model"))
    unwrap_model(model_chunks[0]).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    load_rng(ckpt_dir, dist.get_rank())
    return state
