"""Stream the policy's weights from Megatron (TP x PP) into the vLLM rollout engine, bucket by bucket.

Per bucket (see ``plan.py`` for how buckets are cut), on the ranks that take part:

1. **TP gather** on the owning pipeline stage: one ``all_gather`` per parameter inside the
   Megatron TP group, then ``hf_mapping.tp_gather`` puts the shards back together (fc1's gate/up
   halves are interleaved per rank, so it is not a plain cat);
2. **convert** with ``hf_mapping.megatron_to_hf``: split fused qkv (and its bias) / fc1, strip
   vocab padding, drop the tied output copy; the results are views, no copy;
3. **PP move**: when the engine on other stages' ranks needs the bucket, the owner packs it into
   one flat buffer and broadcasts it over the Megatron pipeline group (colocated: every rank hosts
   a vLLM worker, and the pipeline group links exactly one rank of each stage with the same
   (dp, tp) coordinates), or sends it point-to-point to the driver rank (disaggregated). The HF
   layout metadata travels once, on the first sync, and is cached;
4. **feed**: ``engine.load_bucket`` hands the HF tensors to vLLM inside one weight-update session
   (colocated: this rank's own worker; disaggregated: pushed by the engine to its workers).

No rank ever holds more than one bucket of gathered tensors (plus one packed copy when a PP move
is needed), so the extra peak memory is O(bucket size), whatever the model size.
vLLM's weight loaders need full HF tensors and cut their own TP shard; this is also what makes
vLLM TP > number of KV heads work (vLLM replicates KV heads itself).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_grpo.bridge.memory import PeakMemory
from megatron_grpo.bridge.plan import Bucket, global_entries, local_params, make_buckets
from megatron_grpo.models import hf_mapping as hm
from megatron_grpo.models.loader import unwrap_model
from megatron_grpo.models.provider import ModelInfo
from megatron_grpo.rollout.packing import pack_bucket, unpack_bucket

log = logging.getLogger(__name__)


@dataclass
class SyncStats:
    version: int
    seconds: float
    buckets: int
    bytes_loaded: int  # HF bytes handed to vLLM on this rank
    peak_extra_bytes: int | None = None  # measured only with measure_memory=True
    phase_seconds: dict = field(default_factory=dict)


class WeightBridge:
    """Megatron model chunks -> a rollout engine (``ColocatedEngine`` or ``DisaggregatedEngine``).

    Construct once after the model and the engine exist (collective: every trainer rank), then call
    :meth:`sync` on every rank after each optimizer step. ``bucket_mb`` bounds the extra memory;
    ``transfer_dtype`` (e.g. ``torch.bfloat16``) casts before moving when the engine runs in a
    lower precision than the trainer's parameters.
    """

    def __init__(self, model_chunks, engine, info: ModelInfo | None = None, *, bucket_mb: float = 256,
                 transfer_dtype: torch.dtype | None = None, measure_memory: bool = False):
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
        self.buckets: list[Bucket] = make_buckets(global_entries(self.chunks, self.info), self.bucket_bytes)
        self._meta = {}
        self.placement = getattr(engine, "placement", "colocated")
        if self.placement == "disaggregated":
            self.driver = int(engine.driver_rank)
            # the Megatron ranks on the driver's (dp, tp) column take part; others idle during a sync
            self.active = self.dp_rank == 0
            self.is_target = self.rank == self.driver
        else:
            self.driver = None
            self.active = True
            self.is_target = True
        self.version = 0

    # -- per-bucket steps --------------------------------------------------------------------------
    @torch.no_grad()
    def _gather_convert(self, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
        out = []
        convert = self.tp_rank == 0 or self.placement == "colocated"
        for e in bucket.entries:
            shard = self.params[e.name].detach()
            if self.transfer_dtype is not None and shard.dtype != self.transfer_dtype:
                shard = shard.to(self.transfer_dtype)
            if self.tp > 1 and e.kind != "replicated":
                shards = [torch.empty_like(shard) for _ in range(self.tp)]
                dist.all_gather(shards, shard.contiguous(), group=self.tp_group)
                full = hm.tp_gather(e.name, shards, self.info)
            else:
                full = shard
            if convert:
                out.extend(hm.megatron_to_hf(self.info, e.name, full))
        return out

    def _pp_move_broadcast(self, bucket: Bucket, hf):
        src = self.pp_ranks[bucket.stage]
        if self.pp_rank == bucket.stage:
            buf, meta = pack_bucket(hf)
        else:
            buf, meta = None, self._meta.get(bucket.index)
        if bucket.index not in self._meta:
            obj = [meta]
            dist.broadcast_object_list(obj, src=src, group=self.pp_group)
            meta = self._meta[bucket.index] = obj[0]
        if buf is None:
            buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=self._device())
        dist.broadcast(buf, src=src, group=self.pp_group)
        return hf if self.pp_rank == bucket.stage else unpack_bucket(buf, meta)

    def _pp_move_to_driver(self, bucket: Bucket, hf):
        if self.tp_rank != 0:  # only the driver's (dp 0, tp 0) pipeline column moves data
            return None
        src = self.pp_ranks[bucket.stage]
        if src == self.driver:
            return hf
        if self.rank == src:
            buf, meta = pack_bucket(hf)
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
            buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=self._device())
            dist.recv(buf, src=src)
            return unpack_bucket(buf, meta)
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
            if self.active:
                for bucket in self.buckets:
                    t0 = time.perf_counter()
                    hf = self._gather_convert(bucket) if self.pp_rank == bucket.stage else None
                    t1 = time.perf_counter()
                    if self.pp > 1:
                        hf = (self._pp_move_broadcast(bucket, hf) if self.placement == "colocated"
                              else self._pp_move_to_driver(bucket, hf))
                    t2 = time.perf_counter()
                    if self.is_target:
                        self.engine.load_bucket(hf)
                        nbytes += sum(t.numel() * t.element_size() for _, t in hf)
                    del hf
                    t3 = time.perf_counter()
                    phases["gather_convert"] += t1 - t0
                    phases["pp_move"] += t2 - t1
                    phases["load"] += t3 - t2
            t0 = time.perf_counter()
            self.version = self.engine.end_weight_update(version)
            phases["finish"] = time.perf_counter() - t0
        finally:
            if meter:
                meter.__exit__(None, None, None)
        return SyncStats(version=self.version, seconds=time.perf_counter() - started, buckets=len(self.buckets),
                         bytes_loaded=nbytes, peak_extra_bytes=meter.peak_extra_bytes if meter else None,
                         phase_seconds=phases)
