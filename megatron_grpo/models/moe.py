"""Mixture-of-Experts facts: HF config -> ModelInfo fields -> megatron-core MoE config, spec and EP placement.

Why a module of its own: the dense provider stays as it was; everything MoE-specific (which layers are
sparse, router options, expert-parallel divisibility, where an expert lives) is decided here once and
read by the provider, the HF mapping, the loader/exporter and the bridge.

Supported HF families (``ModelInfo.arch``):

* ``qwen3_moe`` (``Qwen3MoeForCausalLM``): softmax router, top-k, ``norm_topk_prob`` (normalised top-k
  probabilities = megatron's default "top-k on logits, softmax over the k"), no shared expert, qk-norm;
* ``qwen2_moe`` (``Qwen2MoeForCausalLM``): the same router (``norm_topk_prob`` usually False = megatron's
  ``moe_router_pre_softmax``), qkv bias, plus one shared expert scaled by ``sigmoid(shared_expert_gate(x))``
  (megatron's ``moe_shared_expert_gate``).

Dense layers where the HF config says so (``mlp_only_layers``, ``decoder_sparse_step``) become
megatron's ``moe_layer_freq`` list. Experts are megatron-core's own modules (local spec, SequentialMLP,
alltoall token dispatcher); expert tensor parallelism equals TP (megatron's default), expert parallelism
(EP) is carved out of data parallelism as megatron does.

Names: on an EP rank megatron names its experts ``mlp.experts.local_experts.{j}`` with a LOCAL index j;
the project's *global* names use the global expert index ``ep_rank * num_local_experts + j`` (as
megatron's own dist checkpoints do), so one name means one expert on every layout.
"""
from __future__ import annotations

import re
from typing import Any

MOE_ARCHES = {"Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe"}
_LOCAL_EXPERT_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")

__all__ = ["MOE_ARCHES", "base_arch", "moe_info_fields", "check_moe_parallel", "moe_config_kwargs", "moe_block_spec",
           "is_expert_param", "expert_offset", "local_to_global_expert", "global_to_local_expert", "shard_position"]


def base_arch(arch: str) -> str:
    """The dense family whose attention an MoE arch shares ("qwen3_moe" -> "qwen3")."""
    return arch[: -len("_moe")] if arch.endswith("_moe") else arch


def moe_info_fields(cfg, arch: str, where: str) -> dict[str, Any]:
    """The ModelInfo MoE fields of an HF config (empty for dense arches); refuses what we cannot reproduce."""
    from .provider import ModelConfigError

    if not arch.endswith("_moe"):
        return {}
    experts, topk = int(cfg.num_experts), int(cfg.num_experts_per_tok)
    if experts < 1 or not 1 <= topk <= experts:
        raise ModelConfigError(f"{where}: num_experts={experts}, num_experts_per_tok={topk} (need 1 <= top-k <= experts)")
    if getattr(cfg, "mlp_bias", False):
        raise ModelConfigError(f"{where}: mlp_bias=True is not supported")
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    moe_layers = tuple(i for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    shared = int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0) if arch == "qwen2_moe" else 0
    return dict(
        num_experts=experts, moe_topk=topk, moe_ffn_hidden_size=int(cfg.moe_intermediate_size),
        moe_norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", arch == "qwen3_moe")), moe_layers=moe_layers,
        moe_aux_loss_coeff=float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0),
        moe_z_loss_coeff=float(getattr(cfg, "router_z_loss_coef", 0.0) or 0.0),
        moe_shared_expert_size=shared, moe_shared_expert_gate=shared > 0,
    )


def check_moe_parallel(info, *, tp: int, ep: int, pp: int = 1, world: int | None = None) -> None:
    """One-line ModelConfigError for every EP divisibility rule (no process group, no megatron import)."""
    from .provider import ModelConfigError

    if ep < 1:
        raise ModelConfigError(f"expert parallel size must be >= 1, got ep={ep}")
    if not info.num_experts:
        if ep > 1:
            raise ModelConfigError(f"expert parallel size {ep} > 1 but {info.hf_architecture} has no experts")
        return
    if info.num_experts % ep:
        raise ModelConfigError(f"expert parallel size {ep} does not divide num_experts={info.num_experts} "
                               f"of {info.hf_architecture}")
    for what, n in (("moe_intermediate_size", info.moe_ffn_hidden_size),
                    ("shared_expert_intermediate_size", info.moe_shared_expert_size)):
        if n % tp:
            raise ModelConfigError(f"tensor parallel size {tp} does not divide {what}={n} of {info.hf_architecture} "
                                   "(expert tensor parallelism equals TP)")
    if world is not None:
        if world % (tp * pp):
            raise ModelConfigError(f"world size {world} is not divisible by tp x pp = {tp} x {pp}")
        if (world // pp) % (tp * ep):
            raise ModelConfigError(f"world size {world} / pp {pp} is not divisible by tp x ep = {tp} x {ep} "
                                   "(expert parallelism is carved out of data parallelism)")


def moe_config_kwargs(info, *, ep: int = 1) -> dict[str, Any]:
    """TransformerConfig keywords for the MoE layers of ``info`` ({} for a dense model)."""
    if not info.num_experts:
        return {}
    kwargs = dict(
        num_moe_experts=info.num_experts, moe_ffn_hidden_size=info.moe_ffn_hidden_size,
        moe_router_topk=info.moe_topk, moe_router_score_function="softmax",
        # HF norm_topk_prob: softmax over the k chosen logits == megatron's default; otherwise softmax
        # over all experts, then top-k (pre-softmax) without renormalising.
        moe_router_pre_softmax=not info.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if info.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=info.moe_aux_loss_coeff, moe_z_loss_coeff=info.moe_z_loss_coeff or None,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_router_dtype="fp32",
        moe_layer_freq=[1 if i in info.moe_layers else 0 for i in range(info.num_layers)],
        expert_model_parallel_size=ep,
    )
    if info.moe_shared_expert_size:
        kwargs.update(moe_shared_expert_intermediate_size=info.moe_shared_expert_size,
                      moe_shared_expert_gate=info.moe_shared_expert_gate)
    return kwargs


def moe_block_spec(info, config, *, te: bool, vp_stage: int | None = None):
    """megatron-core's own decoder block spec: MoE layers (local experts, no grouped GEMM) and dense ones."""
    import inspect

    from megatron.core.models.gpt import gpt_layer_specs as specs

    kwargs = {"use_transformer_engine": te, "normalization": "RMSNorm"}
    if vp_stage is not None and "vp_stage" in inspect.signature(specs.get_gpt_decoder_block_spec).parameters:
        kwargs["vp_stage"] = vp_stage
    return specs.get_gpt_decoder_block_spec(config, **kwargs)


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (sharded over EP and expert-TP, reduced over expert-DP)."""
    return ".mlp.experts." in name


def _ep() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    return 0, 1


def expert_offset(info) -> int:
    """Global index of this rank's first local expert."""
    rank, size = _ep()
    return rank * (info.num_experts // size) if info.num_experts else 0


def local_to_global_expert(name: str, offset: int) -> str:
    m = _LOCAL_EXPERT_RE.match(name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else name


def global_to_local_expert(name: str, offset: int, num_local: int) -> str | None:
    """Global expert name -> this EP rank's local name, or None when another EP rank owns the expert."""
    m = _LOCAL_EXPERT_RE.match(name)
    if not m:
        return name
    j = int(m.group(2)) - offset
    return f"{m.group(1)}{j}{m.group(3)}" if 0 <= j < num_local else None


def shard_position(name: str) -> tuple[int, int, int]:
    """(tp_rank, tp_size, dp_rank) that shard ``name`` on this rank: expert-TP/expert-DP for routed experts."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, 0
    if is_expert_param(name):
        return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_data_parallel_rank())
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_rank()
