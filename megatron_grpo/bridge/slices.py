"""Slice mode: when the trainer's TP equals vLLM's TP, feed each vLLM rank only its own shard.

vLLM's weight loaders take a *full* HF tensor and cut their TP slice themselves
(``loaded_weight.narrow(dim, tp_rank * shard, shard)``). With train TP == vLLM TP and the same
rank order, Megatron TP rank r already holds exactly what vLLM TP rank r will cut, for the
column-parallel (qkv, fc1), row-parallel (o_proj, down_proj) and - when the padded vocabulary
splits the same way - vocab-parallel tensors. So instead of all-gathering every parameter, each rank
hands vLLM a full-shaped tensor in which only its own slice is written (a :class:`Slot`): no TP
communication at all, and a PP move carries shards instead of full tensors.

The full-shaped tensor is ``torch.empty`` plus one slice copy: on CPU the untouched part of a large
allocation is never faulted in; the loader never reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grpo.models import hf_mapping as hm
from megatron_grpo.models.provider import ModelInfo


@dataclass
class Slot:
    """HF tensor ``name`` of shape ``full_shape`` of which only ``[start, start + len)`` along ``dim``
    (``data``) is known on this rank."""

    name: str
    full_shape: tuple[int, ...]
    dim: int
    start: int
    data: torch.Tensor

    def materialize(self) -> torch.Tensor:
        full = torch.empty(self.full_shape, dtype=self.data.dtype, device=self.data.device)
        full.narrow(self.dim, self.start, self.data.shape[self.dim]).copy_(self.data)
        return full

    def info(self) -> tuple:
        return (self.name, tuple(self.full_shape), self.dim, self.start)


SLICEABLE = ("qkv", "fc1", "row", "vocab")


def to_slots(info: ModelInfo, name: str, kind: str, shard: torch.Tensor, tp_rank: int, tp: int) -> list[Slot]:
    """This rank's shard of Megatron parameter ``name`` as HF slots (see module docstring).

    Which HF rows/columns the shard holds comes from the mapping's own ``hf_slice_for`` (the loader
    uses the same plan to read a rank's shard from an HF checkpoint), so the two cannot disagree.
    """
    if info.tie_word_embeddings and hm.canonical_name(name) == "output_layer.weight":
        return []  # the tied copy: vLLM gets the embedding
    padded = shard.shape[0] * tp if kind == "vocab" else None
    plan = hm.hf_slice_for(info, name, tp_rank=tp_rank, tp_size=tp, padded_vocab_size=padded)
    if kind == "qkv":
        parts = hm.split_qkv(shard, num_query_groups=plan.num_query_groups,
                             num_attention_heads=info.num_attention_heads // tp, head_dim=info.head_dim)
    elif kind == "fc1":
        parts = hm.split_fc1(shard)
    elif kind == "row":
        parts = (shard,)
    elif kind == "vocab":
        parts = (shard[: shard.shape[0] - plan.pad_rows],)
    else:
        raise ValueError(f"{name}: kind {kind!r} has no slice form")
    shapes = hm.hf_param_shapes(info)
    return [Slot(sl.hf_name, tuple(shapes[sl.hf_name]), sl.dim, sl.start, data)
            for sl, data in zip(plan.parts, parts)]


def vocab_slot_range(info: ModelInfo, name: str, padded_vocab: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """HF vocab rows ``[start, stop)`` that Megatron TP rank ``tp_rank`` holds for ``name``."""
    plan = hm.hf_slice_for(info, name, tp_rank=tp_rank, tp_size=tp, padded_vocab_size=padded_vocab)
    return plan.parts[0].start, plan.parts[0].stop
