"""A private process group between the trainer's sender rank and disaggregated vLLM workers.

It must not be a ``torch.distributed.new_group`` of the default world: the vLLM workers run in
their own processes with their own (vLLM-internal) default world, and the trainer's world must stay
untouched. So the group is built from a TCPStore directly: ``ProcessGroupGloo`` on CPU, vLLM's
``PyNcclCommunicator`` over a ``StatelessProcessGroup`` on CUDA (the pattern vLLM's RLHF examples
use). Rank 0 is always the trainer sender; workers take ranks ``rank_offset + worker_rank``.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class TransferGroup:
    def __init__(self, backend: str, rank: int, world_size: int, pg=None, comm=None, store=None):
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self._pg, self._comm, self._store = pg, comm, store

    @classmethod
    def connect(cls, host: str, port: int, *, rank: int, world_size: int, backend: str = "gloo",
                timeout_s: float = 600.0) -> "TransferGroup":
        """Join (rank 0 hosts the store). Blocks until all ``world_size`` members have joined."""
        timeout = timedelta(seconds=timeout_s)
        if backend == "gloo":
            store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout,
                                  wait_for_workers=False)
            pg = dist.ProcessGroupGloo(dist.PrefixStore("mgrpo-transfer", store), rank, world_size, timeout)
            return cls("gloo", rank, world_size, pg=pg, store=store)
        if backend == "nccl":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            spg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
            comm = PyNcclCommunicator(spg, device=torch.device("cuda", torch.cuda.current_device()))
            return cls("nccl", rank, world_size, comm=comm, store=spg)
        raise ValueError(f"unknown transfer backend {backend!r} (gloo or nccl)")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.backend == "gloo":
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self._pg.broadcast([tensor], opts).wait()
        else:
            self._comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()
        return tensor

    def barrier(self) -> None:
        self.broadcast(torch.zeros(1, dtype=torch.uint8, device="cuda" if self.backend == "nccl" else "cpu"))

    def close(self) -> None:
        self._pg = self._comm = self._store = None
