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


def _restore_adam_steps(optimizer) -> None:
    """Put the checkpoint's Adam step count back into every parameter's torch-Adam state (no TE/apex).

    megatron-core's DistributedOptimizer (0.16 and 0.19) saves torch Adam's per-parameter 'step' only
    in the common param_groups; its 'dp_reshardable' parameter state carries 'step' as a
    LocalNonpersistentObject -- the LOADING optimizer's own step tensor (1 after the dummy step that
    creates the state) -- and ``load_parameter_state_from_dp_reshardable`` copies that back over the
    step that ``load_state_dict`` had just restored. Bias correction then used the wrong step and a
    resumed run drifted (~1e-3 in the loss) from its first update on. Its ``load_state_dict`` also
    gives every parameter the SAME step tensor, which torch Adam increments once per parameter.
    The checkpoint's step survives in each param group ('step'): one fresh tensor per parameter."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if type(sub).__name__ != "DistributedOptimizer" or inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                if torch.is_tensor(st.get("step")) and group.get("step") is not None:
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype, device=st["step"].device)


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


def _is_distributed(optimizer) -> bool:
    return any(type(sub).__name__ == "DistributedOptimizer" for sub in getattr(optimizer, "chained_optimizers", [optimizer]))


def _dcp_exception() -> type:
    """torch.distributed.checkpoint's CheckpointException derives from BaseException (not Exception)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - every supported torch has it
        return Exception
    return CheckpointException


def _first_cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside a CheckpointException (its text is a dump of every rank's
    traceback), e.g. the KeyError naming the optimizer shard that a 'dp_reshardable' checkpoint lacks."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]  # (exception, stack summary)
        first = first[0] if isinstance(first, tuple) and first else first
        if isinstance(first, BaseException):
            return first
    return e


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
    except (Exception, _dcp_exception()) as e:  # megatron-core's own exceptions: one line, on the rank that hit it
        e = _first_cause(e)
        text = str(e).strip().splitlines()
        hint = ""
        if _is_distributed(optimizer) and (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
            hint = (f" (the distributed optimizer's 'dp_reshardable' checkpoint keeps TP x PP: resume at "
                    f"tp={saved['tp']} pp={saved['pp']}, any DP)")
        raise CheckpointError(f"{ckpt_dir}: cannot load the model/optimizer written at {_layout_text(saved)} "
                              f"at {_layout_text(now)}{hint}: {type(e).__name__}: {text[0][:300] if text else ''}") from None
    _restore_adam_steps(optimizer)
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
