"""Process groups: torch.distributed + megatron-core parallel state, on NCCL (CUDA) or gloo (CPU).

No GRPO math here. Everything is keyword arguments so the same call works on megatron-core 0.16
(CPU machines, Python 3.11) and 0.19+ (clusters), whose positional orders differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_grpo.platform import Platform, setup_platform


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0


def _default_single_process_env() -> None:
    """Let a plain `python script.py` run as world size 1 without torchrun."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_grpo.distributed.ports import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def init_distributed(*, tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 600.0,
                     ep: int = 1) -> ParallelLayout:
    """Initialise torch.distributed and megatron-core's model-parallel groups.

    `timeout_s` bounds every collective: a lost rank turns into an error, not a hang. `ep`: expert
    parallel size (MoE), carved out of data parallelism as megatron does (expert TP = TP).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    plat: Platform = setup_platform()
    _default_single_process_env()
    world = int(os.environ["WORLD_SIZE"])
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if (world // pp) % (tp * ep):
        raise ValueError(f"world size {world} / pp {pp} is not divisible by tp*ep = {tp}*{ep}")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=plat.dist_backend,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": plat.device} if plat.cuda else {}),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )
    model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return setup_platform().device
