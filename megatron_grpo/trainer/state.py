"""Save and restore everything a GRPO step depends on, so a resumed run continues bit for bit.

Model and optimizer go through megatron-core dist_checkpointing (every rank writes its shards;
reloadable at another TP/PP for the model). The LR scheduler, sampler position, step counters and
weight version go to ``trainer_state.json`` (rank 0); RNG states per rank. The directory protocol
(``.partial`` -> COMPLETE -> rename) is in ``checkpoint.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_grpo.models import ckpt_versions
from megatron_grpo.models.loader import unwrap_model
from megatron_grpo.trainer.checkpoint import MARKER, CheckpointError, CheckpointWriter, load_rng, save_rng

STATE_FILE = "trainer_state.json"
# The distributed optimizer's checkpoint layout, named explicitly (Megatron-LM's default): megatron-core's own
# default, 'fully_sharded_model_space', is deprecated and 0.19 cannot save it ("flattened_range is not
# supported"). 'dp_reshardable' exists in 0.16 and 0.19; the plain optimizer ignores it.
OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _fill_empty_distributed_optimizer_state(optimizer) -> None:
    """Before a load into a fresh DistributedOptimizer: with torch's Adam (no TE/apex) it has no state and no
    'step' until its first step, and its ``state_dict()`` asserts exactly one step count (megatron-core 0.16
    and 0.19). One step with zero gradients creates the state (megatron-core 0.19's own
    ``_init_optimizer_states_with_dummy_values``); the load then replaces all of it and the parameters."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if type(sub).__name__ != "DistributedOptimizer" or inner is None or any(len(v) for v in inner.state.values()):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if p.numel():
                    p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad()


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core's DistributedOptimizer.load_state_dict gives every parameter's torch-Adam state the SAME
    'step' tensor, which Adam then increments once per parameter: bias correction goes wrong from the
    second step after a resume. One tensor per parameter, as before the save. (Resume with the distributed
    optimizer still drifts, ~1e-3 in the loss after 2 steps, on 0.16 and 0.19: open; the plain one is exact.)"""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def _sharded(model_chunks, optimizer, *, is_loading: bool) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("checkpointing several model chunks per rank (virtual PP) is not supported")
    if is_loading:
        _fill_empty_distributed_optimizer_state(optimizer)
    sd = {"model": unwrap_model(model_chunks[0]).sharded_state_dict()}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=OPTIMIZER_CKPT_METADATA)
    return sd


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
    meta = {**meta, **ckpt_versions.writer_meta()}  # the COMPLETE marker names the writing megatron-core
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
    written_by = json.loads((ckpt_dir / MARKER).read_text()).get(ckpt_versions.META_KEY) if (ckpt_dir / MARKER).is_file() else None
    ckpt_versions.check_readable(ckpt_dir, ckpt_dir / "model", written_by, training=True, error=CheckpointError)
    loaded = dist_checkpointing.load(sharded_state_dict=_sharded(model_chunks, optimizer, is_loading=True),
                                     checkpoint_dir=str(ckpt_dir / "model"))
    unwrap_model(model_chunks[0]).load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 DistributedOptimizer: its main params are views of the model's (grad leaves)
        optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(optimizer)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    load_rng(ckpt_dir, dist.get_rank())
    return state
