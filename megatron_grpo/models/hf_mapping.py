"""The one HF <-> Megatron weight mapping (Llama, Qwen2, Qwen3, Qwen3-MoE, Qwen2-MoE), local- and TE-spec names.

Everything that moves weights between the two worlds goes through here: the HF loader, the
conversion tools and the trainer -> vLLM bridge. Keeping a single table means a layout fix (qkv
interleave, gate/up order, vocab padding, tied embeddings) is made once.

Naming conventions
------------------
* A *global* Megatron name is a ``GPTModel`` parameter name with wrappers stripped (no ``module.``)
  and the GLOBAL layer index: ``decoder.layers.{i}.self_attention.linear_qkv.weight``. A model
  chunk on pipeline stage p holds layers ``[offset, offset + n)`` under LOCAL indices ``0..n-1``;
  :func:`local_to_global_name` / :func:`global_to_local_name` convert.
* A *full* tensor is the TP-gathered tensor (what a TP=1 model would hold), vocab rows padded.
* Local spec names the norms ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``; the
  TransformerEngine spec fuses them into ``self_attention.linear_qkv.layer_norm_weight`` /
  ``mlp.linear_fc1.layer_norm_weight``. Both map to the same HF tensors.
* ``*._extra_state`` (TE fp8 metadata, no weights) never maps to anything.

Layouts (verified against HF logits, see shared notes "stack-facts")
--------------------------------------------------------------------
* ``linear_qkv`` rows are interleaved per KV group g: ``[q rows of the heads in g; k_g; v_g]``;
  the Qwen2 qkv bias uses the same order. TP shards whole groups, so a rank's shard is a
  contiguous dim-0 chunk, which needs ``num_query_groups % tp == 0`` (megatron-core has no
  replicated-KV mode; kv_heads < TP is refused with a clear error).
* ``linear_fc1`` is ``[gate; up]``; per TP rank it is ``cat([gate shard, up shard])``.
* ``linear_proj`` / ``linear_fc2`` shard dim 1; embedding and output layer shard dim 0 over the
  padded vocab; norms are replicated.
* Padded vocab rows (``vocab_size <= row < padded_vocab_size``) are zero when loaded from HF and
  are stripped on export.
* MoE layers (models/moe.py): the router ``mlp.router.weight`` is HF ``mlp.gate.weight`` (replicated);
  routed expert e is ``mlp.experts.local_experts.{e}`` with the GLOBAL expert index e (a rank's local
  index plus its EP offset) and the dense fc1/fc2 layouts (expert TP shards them like TP does); Qwen2-MoE's
  shared expert is ``mlp.shared_experts`` with its sigmoid gate ``gate_weight``. Which MLP rows a layer
  has (dense or one MoE family's) comes from :data:`_MLP_ROWS`.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch

from .provider import ModelInfo

__all__ = [
    "WeightMappingError", "HFSlice", "ShardPlan", "canonical_name", "is_extra_state", "param_kind",
    "megatron_param_names", "megatron_full_shape", "hf_param_shapes", "megatron_to_hf", "hf_to_megatron",
    "fuse_qkv", "split_qkv", "fuse_fc1", "split_fc1", "tp_shard", "tp_gather", "tp_place", "tp_full_shape",
    "hf_slice_for",
    "local_to_global_name", "global_to_local_name", "layer_offset", "num_stage_layers",
]


class WeightMappingError(ValueError):
    """A name with no mapping, a tensor of the wrong shape, or a TP size the layout cannot shard."""


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# per-layer Megatron suffix -> (kind, HF suffixes under model.layers.{i}.)
_LAYER_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (
        "qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
# MoE families' MLP rows; "{e}" stands for the global expert index (see _MLP_ROWS for who has which)
_LAYER_RULES.update({
    "mlp.router.weight": ("replicated", ("mlp.gate.weight",)),
    "mlp.experts.local_experts.{e}.linear_fc1.weight": (
        "fc1", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    "mlp.experts.local_experts.{e}.linear_fc2.weight": ("row", ("mlp.experts.{e}.down_proj.weight",)),
    "mlp.shared_experts.linear_fc1.weight": (
        "fc1", ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight")),
    "mlp.shared_experts.linear_fc2.weight": ("row", ("mlp.shared_expert.down_proj.weight",)),
    "mlp.shared_experts.gate_weight": ("replicated", ("mlp.shared_expert_gate.weight",)),
})
_ROUTED = ("mlp.router.weight", "mlp.experts.local_experts.{e}.linear_fc1.weight",
           "mlp.experts.local_experts.{e}.linear_fc2.weight")
# per-layer MLP rows: "dense" for dense layers (of every arch), the arch's own for its sparse layers
_MLP_ROWS: dict[str, tuple[str, ...]] = {
    "dense": ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"),
    "qwen3_moe": _ROUTED,
    "qwen2_moe": _ROUTED + ("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
                            "mlp.shared_experts.gate_weight"),
}
_EXPERT_IDX_RE = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..+)$")
_GLOBAL_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (DDP / Float16Module ``module.``) from a parameter name."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def is_extra_state(name: str) -> bool:
    return name.endswith("_extra_state")


def _is_moe_layer(info: ModelInfo, layer: int) -> bool:
    return bool(info.num_experts) and layer in info.moe_layers


def _mlp_rows(info: ModelInfo, layer: int) -> tuple[str, ...]:
    return _MLP_ROWS[info.arch if _is_moe_layer(info, layer) else "dense"]


def _expand_experts(info: ModelInfo, rows) -> list[str]:
    """Rows with "{e}" repeated for every expert (expert-major: all of expert 0, then expert 1, ...)."""
    out = [r for r in rows if "{e}" not in r]
    expert_rows = [r for r in rows if "{e}" in r]
    for e in range(info.num_experts if expert_rows else 0):
        out += [r.format(e=e) for r in expert_rows]
    return out


def _rule(info: ModelInfo, name: str) -> tuple[str, list[str], int | None]:
    """(kind, HF names, layer index) for a global Megatron name; refuses names this arch lacks."""
    name = canonical_name(name)
    m = _LAYER_RE.match(name)
    if m:
        layer, suffix = int(m.group(1)), m.group(2)
        em = _EXPERT_IDX_RE.match(suffix)
        expert = int(em.group(2)) if em else None
        suffix = f"{em.group(1)}{{e}}{em.group(3)}" if em else suffix
        if suffix.startswith("mlp.") and not suffix.startswith("mlp.linear_fc1.layer_norm"):
            if suffix not in _mlp_rows(info, layer) or (expert is not None and expert >= info.num_experts):
                what = "an MoE" if _is_moe_layer(info, layer) else "a dense"
                raise WeightMappingError(f"no HF mapping for Megatron parameter {name!r}: layer {layer} of "
                                         f"{info.arch} is {what} layer with {info.num_experts} experts")
        if suffix not in _LAYER_RULES:
            raise WeightMappingError(f"no HF mapping for Megatron parameter {name!r} ({info.arch})")
        if layer >= info.num_layers:
            raise WeightMappingError(f"{name!r}: layer {layer} >= num_layers={info.num_layers}")
        if suffix == "self_attention.linear_qkv.bias" and not info.qkv_bias:
            raise WeightMappingError(f"{name!r}: {info.arch} has no qkv bias")
        if suffix.startswith(("self_attention.q_layernorm", "self_attention.k_layernorm")) and not info.qk_layernorm:
            raise WeightMappingError(f"{name!r}: {info.arch} has no q/k layernorm")
        kind, hf = _LAYER_RULES[suffix]
        return kind, [f"model.layers.{layer}.{s.format(e=expert)}" for s in hf], layer
    if name in _GLOBAL_RULES:
        kind, hf = _GLOBAL_RULES[name]
        if name == "output_layer.weight" and info.tie_word_embeddings:
            hf = ("model.embed_tokens.weight",)  # the last stage's copy of the tied embedding
        return kind, list(hf), None
    raise WeightMappingError(f"no HF mapping for Megatron parameter {name!r} ({info.arch})")


def param_kind(info: ModelInfo, megatron_name: str) -> str:
    """One of ``replicated``, ``qkv``, ``fc1``, ``row``, ``vocab`` (how TP shards it)."""
    return _rule(info, megatron_name)[0]


def megatron_param_names(info: ModelInfo, *, te_names: bool = False) -> list[str]:
    """All global Megatron parameter names of a TP=1/PP=1 model, in model order.

    A tied model has no ``output_layer.weight`` here (with PP>1 the last stage holds a copy, which
    :func:`hf_slice_for` maps to the embedding).
    """
    names = ["embedding.word_embeddings.weight"]
    for i in range(info.num_layers):
        p = f"decoder.layers.{i}."
        names.append(p + ("self_attention.linear_qkv.layer_norm_weight" if te_names else "input_layernorm.weight"))
        names.append(p + "self_attention.linear_qkv.weight")
        if info.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if info.qk_layernorm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names.append(p + "self_attention.linear_proj.weight")
        fused = te_names and not _is_moe_layer(info, i)  # TE fuses the norm into a dense fc1 only
        names.append(p + ("mlp.linear_fc1.layer_norm_weight" if fused else "pre_mlp_layernorm.weight"))
        names += [p + s for s in _expand_experts(info, _mlp_rows(info, i))]
    names.append("decoder.final_layernorm.weight")
    if not info.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_param_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor (the loader checks files against it)."""
    H, F, hd = info.hidden_size, info.ffn_hidden_size, info.head_dim
    q, kv = info.num_attention_heads * hd, info.num_query_groups * hd
    shapes = {"model.embed_tokens.weight": (info.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(info.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
        })
        if not _is_moe_layer(info, i):
            shapes.update({p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                           p + "mlp.down_proj.weight": (H, F)})
        else:
            mF, sF = info.moe_ffn_hidden_size, info.moe_shared_expert_size
            shapes[p + "mlp.gate.weight"] = (info.num_experts, H)
            for e in range(info.num_experts):
                x = f"{p}mlp.experts.{e}."
                shapes.update({x + "gate_proj.weight": (mF, H), x + "up_proj.weight": (mF, H),
                               x + "down_proj.weight": (H, mF)})
            if sF:
                x = p + "mlp.shared_expert."
                shapes.update({x + "gate_proj.weight": (sF, H), x + "up_proj.weight": (sF, H),
                               x + "down_proj.weight": (H, sF), p + "mlp.shared_expert_gate.weight": (1, H)})
        if info.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if info.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    if not info.tie_word_embeddings:
        shapes["lm_head.weight"] = (info.vocab_size, H)
    return shapes


def megatron_full_shape(info: ModelInfo, megatron_name: str, *, padded_vocab_size: int | None = None) -> tuple[int, ...]:
    """Shape of the full (TP-gathered) Megatron tensor; vocab rows = ``padded_vocab_size`` (or true vocab)."""
    kind, hf, _ = _rule(info, megatron_name)
    shapes = hf_param_shapes(info)
    if kind == "vocab":
        return (padded_vocab_size or info.vocab_size, info.hidden_size)
    parts = [shapes[n] for n in hf]
    if kind in ("qkv", "fc1"):
        return (sum(p[0] for p in parts), *parts[0][1:])
    return parts[0]


# ---------------------------------------------------------------- fused tensors


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int) -> torch.Tensor:
    """HF q/k/v (weights or biases, or matching row slices of them) -> Megatron interleaved qkv."""
    G, rest = num_query_groups, q.shape[1:]
    return torch.cat([q.reshape(G, -1, *rest), k.reshape(G, -1, *rest), v.reshape(G, -1, *rest)], dim=1).reshape(
        -1, *rest)


def split_qkv(qkv: torch.Tensor, *, num_query_groups: int, num_attention_heads: int, head_dim: int):
    """Megatron interleaved qkv (full, or one TP shard with its own group/head counts) -> (q, k, v)."""
    G, rest = num_query_groups, qkv.shape[1:]
    per_group = num_attention_heads // G
    sizes = [per_group * head_dim, head_dim, head_dim]
    if G == 1:  # already [q; k; v]
        return tuple(torch.split(qkv, sizes, dim=0))
    # one copy into a [q; k; v] buffer: the three results are adjacent views of it, which vLLM's
    # fused qkv_proj can take without another copy (rollout/cpu_direct_load.py)
    grouped = qkv.reshape(G, (per_group + 2) * head_dim, *rest)
    out = torch.empty((G * sum(sizes), *rest), dtype=qkv.dtype, device=qkv.device)
    views, lo = [], 0
    for part, size in zip(torch.split(grouped, sizes, dim=1), sizes):
        view = out[lo * G:(lo + size) * G]
        view.view(G, size, *rest).copy_(part)
        views.append(view)
        lo += size
    return tuple(views)


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def _check_shape(info: ModelInfo, name: str, t: torch.Tensor, kind: str) -> None:
    expected = megatron_full_shape(info, name, padded_vocab_size=t.shape[0] if kind == "vocab" else None)
    if tuple(t.shape) != expected or (kind == "vocab" and t.shape[0] < info.vocab_size):
        want = f"(>= {info.vocab_size}, {info.hidden_size})" if kind == "vocab" else str(expected)
        raise WeightMappingError(
            f"{name}: expected a full (TP-gathered) tensor of shape {want}, got {tuple(t.shape)}")


def megatron_to_hf(info: ModelInfo, megatron_name: str, full_tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One full Megatron tensor -> its HF tensors (views where possible; callers copy if needed).

    Splits qkv (and its bias) and fc1, strips vocab padding rows, and emits nothing for a tied
    ``output_layer.weight`` or ``_extra_state``.
    """
    name = canonical_name(megatron_name)
    if is_extra_state(name):
        return []
    if name == "output_layer.weight" and info.tie_word_embeddings:
        return []
    if name.endswith(".bias") and full_tensor.numel() == 0:  # TE registers empty biases
        return []
    kind, hf, _ = _rule(info, name)
    _check_shape(info, name, full_tensor, kind)
    if kind == "qkv":
        parts = split_qkv(full_tensor, num_query_groups=info.num_query_groups,
                          num_attention_heads=info.num_attention_heads, head_dim=info.head_dim)
        return list(zip(hf, parts))
    if kind == "fc1":
        return list(zip(hf, split_fc1(full_tensor)))
    if kind == "vocab":
        return [(hf[0], full_tensor[: info.vocab_size])]
    return [(hf[0], full_tensor)]


TensorSource = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]


def _getter(hf_tensors: TensorSource) -> Callable[[str], torch.Tensor]:
    if callable(hf_tensors) and not isinstance(hf_tensors, Mapping):
        return hf_tensors

    def get(name: str) -> torch.Tensor:
        try:
            return hf_tensors[name]
        except KeyError:
            raise WeightMappingError(f"HF tensor {name!r} is missing") from None

    return get


def hf_to_megatron(info: ModelInfo, hf_tensors: TensorSource, *, padded_vocab_size: int | None = None,
                   te_names: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors (dict or ``name -> tensor`` getter) -> (global Megatron name, full tensor), in model order.

    Embedding/output rows are zero-padded to ``padded_vocab_size`` (default: no padding).
    """
    get = _getter(hf_tensors)
    shapes = hf_param_shapes(info)
    for name in megatron_param_names(info, te_names=te_names):
        kind, hf, _ = _rule(info, name)
        parts = []
        for n in hf:
            t = get(n)
            if tuple(t.shape) != shapes[n]:
                raise WeightMappingError(f"HF tensor {n}: expected shape {shapes[n]}, got {tuple(t.shape)}")
            parts.append(t)
        if kind == "qkv":
            yield name, fuse_qkv(*parts, num_query_groups=info.num_query_groups)
        elif kind == "fc1":
            yield name, fuse_fc1(*parts)
        elif kind == "vocab":
            yield name, _pad_rows(parts[0], (padded_vocab_size or info.vocab_size) - info.vocab_size)
        else:
            yield name, parts[0]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows < 0:
        raise WeightMappingError(f"padded vocab is smaller than the vocab ({t.shape[0]} rows)")
    if rows == 0:
        return t
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))], dim=0)


# ---------------------------------------------------------------- tensor parallel


def _check_tp(info: ModelInfo, name: str, kind: str, dim_size: int, tp_size: int) -> None:
    if kind == "qkv" and info.num_query_groups % tp_size:
        raise WeightMappingError(
            f"{name}: num_key_value_heads={info.num_query_groups} is not divisible by tensor parallel size "
            f"{tp_size}; megatron-core shards whole KV groups (num_query_groups % tp == 0)")
    if dim_size % tp_size:
        raise WeightMappingError(f"{name}: sharded dimension {dim_size} is not divisible by tensor parallel size {tp_size}")


def tp_shard(megatron_name: str, full_tensor: torch.Tensor, tp_rank: int, tp_size: int, info: ModelInfo) -> torch.Tensor:
    """The slice of a full Megatron tensor that TP rank ``tp_rank`` of ``tp_size`` holds."""
    kind = param_kind(info, megatron_name)
    if kind == "replicated" or tp_size == 1:
        return full_tensor
    if kind == "fc1":
        gate, up = split_fc1(full_tensor)
        _check_tp(info, megatron_name, kind, gate.shape[0], tp_size)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    dim = 1 if kind == "row" else 0
    _check_tp(info, megatron_name, kind, full_tensor.shape[dim], tp_size)
    return full_tensor.chunk(tp_size, dim)[tp_rank]


def tp_full_shape(megatron_name: str, shard_shape: Sequence[int], tp_size: int, info: ModelInfo) -> tuple[int, ...]:
    """Shape of the full tensor that TP shards of ``shard_shape`` make up."""
    kind = param_kind(info, megatron_name)
    shape = list(shard_shape)
    if kind != "replicated":
        shape[1 if kind == "row" else 0] *= tp_size
    return tuple(shape)


def tp_place(megatron_name: str, full: torch.Tensor, shard: torch.Tensor, tp_rank: int, tp_size: int,
             info: ModelInfo) -> None:
    """Write TP rank ``tp_rank``'s shard into its place in ``full`` (inverse of :func:`tp_shard`)."""
    kind = param_kind(info, megatron_name)
    if kind == "replicated" or tp_size == 1:
        full.copy_(shard)
    elif kind == "fc1":  # [gate_r; up_r] -> rows r of the gate half and of the up half
        gate, up = split_fc1(shard)
        n, half = gate.shape[0], full.shape[0] // 2
        full.narrow(0, tp_rank * n, n).copy_(gate)
        full.narrow(0, half + tp_rank * n, n).copy_(up)
    else:
        dim = 1 if kind == "row" else 0
        n = shard.shape[dim]
        full.narrow(dim, tp_rank * n, n).copy_(shard)


def tp_gather(megatron_name: str, shards: Sequence[torch.Tensor], info: ModelInfo) -> torch.Tensor:
    """Inverse of :func:`tp_shard`: shards in TP-rank order -> the full tensor."""
    if param_kind(info, megatron_name) == "replicated" or len(shards) == 1:
        return shards[0]
    first = shards[0]
    full = torch.empty(tp_full_shape(megatron_name, first.shape, len(shards), info), dtype=first.dtype,
                       device=first.device)
    for rank, shard in enumerate(shards):
        tp_place(megatron_name, full, shard, rank, len(shards), info)
    return full


# ---------------------------------------------------------------- slice reads


@dataclass(frozen=True)
class HFSlice:
    """Rows/columns ``[start, stop)`` along ``dim`` of one HF tensor; ``dim=None`` = the whole tensor."""

    hf_name: str
    dim: int | None = None
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class ShardPlan:
    """What a TP rank reads for one Megatron parameter, and how the pieces become its shard."""

    megatron_name: str
    kind: str
    parts: tuple[HFSlice, ...]
    shape: tuple[int, ...]  # the Megatron shard shape the assembled tensor must have
    num_query_groups: int = 0  # groups in this shard (qkv)
    pad_rows: int = 0  # zero rows appended (vocab padding that falls in this shard)

    def assemble(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.kind == "qkv":
            out = fuse_qkv(*tensors, num_query_groups=self.num_query_groups)
        elif self.kind == "fc1":
            out = fuse_fc1(*tensors)
        elif self.kind == "vocab":
            out = _pad_rows(tensors[0], self.pad_rows)
        else:
            out = tensors[0]
        if tuple(out.shape) != self.shape:
            raise WeightMappingError(f"{self.megatron_name}: assembled {tuple(out.shape)}, expected {self.shape}")
        return out


def hf_slice_for(info: ModelInfo, megatron_name: str, *, tp_rank: int, tp_size: int,
                 padded_vocab_size: int | None = None) -> ShardPlan:
    """Which slices of which HF tensors TP rank ``tp_rank`` needs for ``megatron_name`` (a global name).

    Lets a rank read only its part with safetensors ``get_slice`` instead of whole tensors.
    """
    name = canonical_name(megatron_name)
    kind, hf, _ = _rule(info, name)
    full = megatron_full_shape(info, name, padded_vocab_size=padded_vocab_size)
    shapes = hf_param_shapes(info)
    if kind == "replicated":
        return ShardPlan(name, kind, (HFSlice(hf[0]),), full)
    if kind == "qkv":
        _check_tp(info, name, kind, full[0], tp_size)
        g = info.num_query_groups // tp_size
        qg = info.num_attention_heads // info.num_query_groups * info.head_dim  # q rows per group
        parts = (HFSlice(hf[0], 0, tp_rank * g * qg, (tp_rank + 1) * g * qg),
                 HFSlice(hf[1], 0, tp_rank * g * info.head_dim, (tp_rank + 1) * g * info.head_dim),
                 HFSlice(hf[2], 0, tp_rank * g * info.head_dim, (tp_rank + 1) * g * info.head_dim))
        return ShardPlan(name, kind, parts, (full[0] // tp_size, *full[1:]), num_query_groups=g)
    if kind == "fc1":
        F = shapes[hf[0]][0]
        _check_tp(info, name, kind, F, tp_size)
        s = F // tp_size
        parts = tuple(HFSlice(n, 0, tp_rank * s, (tp_rank + 1) * s) for n in hf)
        return ShardPlan(name, kind, parts, (full[0] // tp_size, *full[1:]))
    if kind == "row":
        _check_tp(info, name, kind, full[1], tp_size)
        s = full[1] // tp_size
        return ShardPlan(name, kind, (HFSlice(hf[0], 1, tp_rank * s, (tp_rank + 1) * s),), (full[0], s))
    # vocab: shard rows of the padded table; rows past the true vocab are zero padding
    _check_tp(info, name, kind, full[0], tp_size)
    s = full[0] // tp_size
    start, stop = min(tp_rank * s, info.vocab_size), min((tp_rank + 1) * s, info.vocab_size)
    return ShardPlan(name, kind, (HFSlice(hf[0], 0, start, stop),), (s, full[1]), pad_rows=s - (stop - start))


# ---------------------------------------------------------------- pipeline parallel


def local_to_global_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.{i}.x`` on a stage whose first layer is ``layer_offset`` -> global index."""
    name = canonical_name(name)
    m = _LAYER_RE.match(name)
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else name


def global_to_local_name(name: str, layer_offset: int, num_layers_on_stage: int) -> str | None:
    """Global name -> this stage's local name, or None when the layer lives on another stage.

    Non-layer names (embedding, final norm, output layer) are returned unchanged: whether a stage
    holds them depends on pre_process/post_process, which the caller knows.
    """
    name = canonical_name(name)
    m = _LAYER_RE.match(name)
    if not m:
        return name
    local = int(m.group(1)) - layer_offset
    if not 0 <= local < num_layers_on_stage:
        return None
    return f"decoder.layers.{local}.{m.group(2)}"


def _call_layer_helper(fn, config, pp_rank: int, vp_stage: int | None):
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "vp_stage" in params:
        kwargs["vp_stage"] = vp_stage
    if "pp_rank" not in params:
        return None
    return fn(config, pp_rank=pp_rank, **kwargs)


def layer_offset(config, *, pp_rank: int, vp_stage: int | None = None) -> int:
    """Global index of the first layer on pipeline stage ``pp_rank`` (megatron's own rule when available)."""
    try:
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
        out = _call_layer_helper(get_transformer_layer_offset, config, pp_rank, vp_stage)
        if out is not None:
            return int(out)
    except ImportError:
        pass
    return pp_rank * (config.num_layers // config.pipeline_model_parallel_size)


def num_stage_layers(config, *, pp_rank: int, vp_stage: int | None = None) -> int:
    """How many transformer layers pipeline stage ``pp_rank`` builds."""
    try:
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        out = _call_layer_helper(get_num_layers_to_build, config, pp_rank, vp_stage)
        if out is not None:
            return int(out)
    except ImportError:
        pass
    return config.num_layers // config.pipeline_model_parallel_size
