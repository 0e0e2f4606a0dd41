"""Bodies for tests/test_torchrun_pool.py: real gloo process groups, no megatron (cheap to start)."""
from __future__ import annotations

import os
import time


def allreduce(fail_rank: int = -1, hang_rank: int = -1) -> dict:
    """Initialise the default group as the model code does (env://), all-reduce, report who ran it."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    if rank == fail_rank:
        raise RuntimeError(f"body failed on rank {rank} on purpose")
    if rank == hang_rank:
        time.sleep(3600)
    dist.barrier()
    dist.destroy_process_group()
    return {"pid": os.getpid(), "sum": float(t), "marker": os.environ.get("POOL_TEST_MARKER"),
            "seed": torch.initial_seed(), "draw": float(torch.rand(1))}


def leave_state_behind() -> dict:
    """A body that leaves the process group initialised, the default dtype changed and cwd moved."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend="gloo")
    torch.set_default_dtype(torch.float64)
    os.chdir("/")
    os.environ["POOL_TEST_LEFTOVER"] = "1"
    return {"pid": os.getpid()}


def clean_state() -> dict:
    import torch
    import torch.distributed as dist

    return {"pid": os.getpid(), "initialized": dist.is_initialized(), "dtype": str(torch.get_default_dtype()),
            "cwd": os.getcwd(), "leftover": os.environ.get("POOL_TEST_LEFTOVER")}
