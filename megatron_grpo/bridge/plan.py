"""The static part of a weight sync: which parameters exist on which pipeline stage, and the buckets.

Computed once (parameter names and shapes never change during training) with one object
all-gather over the pipeline group, so every rank knows the global parameter order without any
rank holding more than names and sizes.

Bucket rules, and why:
* a bucket never spans two pipeline stages: each bucket has exactly one owning stage, so moving it
  is one broadcast from that stage;
* a bucket never splits the parameters of one Megatron module (``linear_qkv.weight`` and
  ``linear_qkv.bias`` travel together): they land in one vLLM module (``qkv_proj``), and vLLM
  re-processes a module as soon as all its weights arrived, so splitting would keep a half-loaded
  module buffered across buckets;
* otherwise buckets are filled greedily up to ``bucket_bytes`` of full (TP-gathered) tensor bytes;
  a module larger than the limit gets a bucket of its own.

MoE with expert parallelism: a routed expert lives on one EP rank (``ParamEntry.ep_owner``); the
plan lists every expert of a layer (all EP ranks' entries, one object all-gather over the EP group)
so every rank walks the same buckets, and the sync streams each expert from its owner.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_grpo.models import hf_mapping as hm
from megatron_grpo.models.loader import named_global_parameters
from megatron_grpo.models.provider import ModelInfo


@dataclass(frozen=True)
class ParamEntry:
    name: str  # global Megatron name
    stage: int  # pipeline rank that owns it
    kind: str  # hf_mapping.param_kind: replicated / qkv / fc1 / row / vocab
    local_shape: tuple[int, ...]
    dtype: str
    full_nbytes: int
    ep_owner: int = -1  # routed experts at EP > 1: the EP rank that holds it; -1 = every EP rank

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass
class Bucket:
    index: int
    stage: int
    entries: list[ParamEntry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.full_nbytes for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def skip_param(info: ModelInfo, name: str) -> bool:
    """Parameters with no HF counterpart: the last stage's copy of a tied embedding."""
    return info.tie_word_embeddings and hm.canonical_name(name) == "output_layer.weight"


def local_params(model_chunks, info: ModelInfo) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in named_global_parameters(model_chunks) if not skip_param(info, n)]


def local_entries(model_chunks, info: ModelInfo, *, pp_rank: int, tp_size: int) -> list[ParamEntry]:
    from megatron_grpo.models.moe import is_expert_param, shard_position

    out = []
    for name, p in local_params(model_chunks, info):
        kind = hm.param_kind(info, name)
        expert = is_expert_param(name)
        mult = 1 if kind == "replicated" else (shard_position(name)[1] if expert else tp_size)
        out.append(ParamEntry(name, pp_rank, kind, tuple(p.shape), str(p.dtype).removeprefix("torch."),
                              p.numel() * p.element_size() * mult, ep_owner=_ep_rank() if expert else -1))
    return out


def _ep_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_rank() if ps.get_expert_model_parallel_world_size() > 1 else -1


def _with_all_experts(mine: list[ParamEntry]) -> list[ParamEntry]:
    """``mine`` with the other EP ranks' experts inserted where this rank's experts of a layer start."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_world_size() == 1:
        return mine
    gathered = [None] * ps.get_expert_model_parallel_world_size()
    dist.all_gather_object(gathered, [e for e in mine if e.ep_owner >= 0],
                           group=ps.get_expert_model_parallel_group())
    by_layer: dict[str, list[ParamEntry]] = {}
    for e in (e for rank_entries in gathered for e in rank_entries):
        by_layer.setdefault(e.name.split(".mlp.experts.")[0], []).append(e)
    out, done = [], set()
    for e in mine:
        if e.ep_owner < 0:
            out.append(e)
            continue
        layer = e.name.split(".mlp.experts.")[0]
        if layer not in done:
            done.add(layer)
            out += sorted(by_layer[layer], key=lambda x: (int(x.name.split(".local_experts.")[1].split(".")[0]), x.name))
    return out


def make_buckets(entries: list[ParamEntry], bucket_bytes: int) -> list[Bucket]:
    """Greedy buckets over ``entries`` (already in global order: stage, then model order)."""
    if bucket_bytes <= 0:
        raise ValueError("bucket size must be positive")
    buckets: list[Bucket] = []
    i = 0
    while i < len(entries):
        # one Megatron module = consecutive entries with the same module path on the same stage
        j = i + 1
        while j < len(entries) and entries[j].module == entries[i].module and entries[j].stage == entries[i].stage:
            j += 1
        group = entries[i:j]
        size = sum(e.full_nbytes for e in group)
        cur = buckets[-1] if buckets else None
        if cur is None or cur.stage != group[0].stage or (cur.entries and cur.nbytes + size > bucket_bytes):
            cur = Bucket(len(buckets), group[0].stage)
            buckets.append(cur)
        cur.entries.extend(group)
        i = j
    return buckets


def global_entries(model_chunks, info: ModelInfo) -> list[ParamEntry]:
    """All stages' entries in global order, known on every rank (one object all-gather over PP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    mine = _with_all_experts(
        local_entries(model_chunks, info, pp_rank=pp_rank, tp_size=ps.get_tensor_model_parallel_world_size()))
    if pp == 1:
        return mine
    gathered = [None] * pp
    dist.all_gather_object(gathered, mine, group=ps.get_pipeline_model_parallel_group())
    return [e for stage_entries in gathered for e in stage_entries]
