"""Zero-copy reads of the other pipeline stages' parameters, for colocated vLLM on one host (CPU).

Why: colocated with PP > 1, every rank's vLLM replica needs every stage's layers. Moving them
through a shared-memory slot (``shm.py``) costs each stage one copy of all its tensors per sync
plus two barriers per round: at (TP 1, PP 2 -> vLLM TP 1) about 0.045 s of a 0.21 s sync, on top of
the pack that each replica must do anyway. Instead, each rank's parameter *storages* are moved
once into shared memory with torch's own storage sharing (the mechanism behind
``torch.multiprocessing``'s ``file_system`` strategy). The move is in place: the storage object keeps
its identity, so the Parameter, the optimizer, DDP's contiguous buffers and every other view follow
it. The other stages map those storages by name and convert straight from them: a sync then costs
each rank only its own replica's conversion and pack.

Validity: a stage's tensors are read only inside a sync, between two collectives of the pipeline
group, when no rank can be inside an optimizer step. Storages are checked again at every sync: a
parameter whose storage was replaced (``param.data = ...``) is shared again and its new handle
sent to the other stages, so a stale mapping is never read.

Only for CPU tensors of ranks on one host; the caller decides (``available``, ``shm_free_bytes``)
and falls back to the slot path otherwise. The files live in /dev/shm as long as some process maps
them; torch's ``torch_shm_manager`` unlinks them when the last one exits, crashes included.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def available() -> bool:
    """torch's filename-based storage sharing exists on this build (feature detection)."""
    return hasattr(torch.UntypedStorage, "_share_filename_cpu_") and \
        hasattr(torch.UntypedStorage, "_new_shared_filename_cpu")


def shm_free_bytes(path: str = "/dev/shm") -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what sharing them moves to /dev/shm)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class TensorHandle:
    """Where a tensor lives in another process's shared storage (picklable, a few bytes)."""

    manager: bytes
    filename: bytes
    storage_nbytes: int
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


def _handle(t: torch.Tensor) -> TensorHandle:
    manager, filename, nbytes = t.untyped_storage()._share_filename_cpu_()
    return TensorHandle(manager, filename, int(nbytes), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                        str(t.dtype).removeprefix("torch."))


def _key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


class SharedParams:
    """This rank's parameters shared, and the other members' mapped (collective constructor).

    ``params``: this rank's name -> tensor (Megatron names, as the bridge plans them); ``group``:
    the pipeline group (one rank per stage with this rank's (dp, tp) coordinates).
    """

    def __init__(self, params: dict[str, torch.Tensor], group):
        self.params = params
        self.group = group
        self.index = dist.get_rank(group)
        self._keys: dict[str, tuple] = {}
        self._handles: dict[str, TensorHandle] = {}
        self._storages: dict[bytes, torch.UntypedStorage] = {}  # mapped other members' storages
        self.remote: list[dict[str, torch.Tensor]] = []  # per member; empty dict for this rank
        self.refresh()

    def _share_changed(self) -> bool:
        changed = False
        for name, p in self.params.items():
            t = p.detach()
            if self._keys.get(name) != _key(t):
                self._handles[name] = _handle(t)  # moves the storage to shm (once; a no-op when shared)
                self._keys[name] = _key(t)  # the move changes the data pointer
                changed = True
        return changed

    def refresh(self) -> None:
        """Collective over the group; on return every member's tensors are final for this sync (each
        member entered it after its optimizer step) and mapped here."""
        changed = torch.tensor([1 if self._share_changed() else 0], dtype=torch.int32)
        dist.all_reduce(changed, op=dist.ReduceOp.MAX, group=self.group)
        if not int(changed) and self.remote:
            return
        handles = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(handles, self._handles, group=self.group)
        storages, self.remote = {}, []
        for member, table in enumerate(handles):
            if member == self.index:
                self.remote.append({})
                continue
            mapped = {}
            for name, h in table.items():
                st = storages.get(h.filename, self._storages.get(h.filename))
                if st is None:
                    st = torch.UntypedStorage._new_shared_filename_cpu(h.manager, h.filename, h.storage_nbytes)
                storages[h.filename] = st
                mapped[name] = torch.empty(0, dtype=getattr(torch, h.dtype)).set_(st, h.offset, h.shape, h.stride)
            self.remote.append(mapped)
        self._storages = storages  # storages no longer named by any member are unmapped

    def barrier(self) -> None:
        dist.barrier(group=self.group)
