"""Save and restore everything a GRPO step depends on, so a resumed run continues bit for bit.

Model and optimizer go through megatron-core dist_checkpointing (every rank writes its shards;
the model's sharded tensors reload at another TP/PP/DP; the distributed optimizer's 'dp_reshardable'
format keeps TP x PP fixed). Exact continuation needs the same layout:
at another layout the per-rank RNG states do not map onto the new ranks and are re-seeded from
(seed, step, rank); the sampler and rollout seeds are global, so prompts and sampling seeds continue.
The LR scheduler, sampler position, step counters and
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
INFLIGHT_FILE, INFLIGHT_KEY = "inflight_rollout.json", "inflight_rollout"  # rollout.async_steps=1 (rollout/prefetch.py)
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
        inflight = state.pop(INFLIGHT_KEY, None)  # async rollout's batch in flight: a compact file of its own
        if inflight is not None:
            (tmp / INFLIGHT_FILE).write_text(json.dumps(inflight, separators=(",", ":")))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    dist.barrier()
    meta = {**meta, **ckpt_versions.writer_meta()}  # the COMPLETE marker names the writing megatron-core
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
    if (ckpt_dir / INFLIGHT_FILE).is_file():  # float repr round-trips: the batch comes back bit for bit
        try:
            state[INFLIGHT_KEY] = json.loads((ckpt_dir / INFLIGHT_FILE).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{ckpt_dir / INFLIGHT_FILE}: not valid JSON ({e.msg})") from None
    written_by = json.loads((ckpt_dir / MARKER).read_text()).get(ckpt_versions.META_KEY) if (ckpt_dir / MARKER).is_file() else None
    ckpt_versions.check_readable(ckpt_dir, ckpt_dir / "model", written_by, training=True, error=CheckpointError)
    now, meta = current_layout(), marker_meta(ckpt_dir)
    saved = {k: meta.get(k, now[k]) for k in now}
    try:
        loaded = dist_checkpointing.load(sharded_state_dict=_sharded(model_chunks, optimizer, is_loading=True),
                                         checkpoint_dir=str(ckpt_dir / "model"))
        unwrap_model(model_chunks[0]).load_state_dict(loaded["model"])
        with torch.no_grad():  # fp32 DistributedOptimizer: its main params are views of the model's (grad leaves)
            optimizer.load_state_dict(loaded["optimizer"])
    except Exception as e:  # megatron-core's own exceptions: one line, on the rank that hit it
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt_dir}: cannot load the model/optimizer written at {_layout_text(saved)} "
                              f"at {_layout_text(now)}: {type(e).__name__}: {text[0][:300] if text else ''}") from None
    _unshare_adam_steps(optimizer)
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
