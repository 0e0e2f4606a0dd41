"""HF config -> megatron-core ``TransformerConfig`` + layer spec -> ``GPTModel`` (Llama, Qwen2, Qwen3).

Why a provider of our own: users bring Hugging Face checkpoints (as in NeMo-RL/veRL) and expect the
Megatron model to produce the *same* logits. Every HF knob that changes the math (RMSNorm eps, RoPE
base and llama3/linear scaling, qkv bias, qk-norm, head_dim, GQA, tied embeddings) is mapped here, and
anything we cannot reproduce exactly (sliding window, yarn, o_proj bias, non-SiLU MLP, ...) is refused
with a one-line error instead of silently training a different model.

All megatron-core calls use keyword arguments only: 0.16 (CPU machines) and 0.19+ (clusters) differ in
positional orders. Optional features are found by ``inspect.signature``, never by version strings.

Vocabulary padding: the embedding and output layer hold ``padded_vocab_size`` rows (a multiple of
``make_vocab_size_divisible_by * tp``, as Megatron's ``--make-vocab-size-divisible-by`` does) so they
shard evenly over TP. The padded rows are zero when loaded from HF, so their logits are exactly 0, not
-inf: consumers of logits (logprobs, sampling, entropy) must mask ids ``>= info.vocab_size`` to -inf
before any softmax. ``ModelInfo.vocab_size`` is the true size; ``padded_vocab_size()`` the padded one.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .moe import MOE_ARCHES, base_arch, check_moe_parallel, moe_block_spec, moe_config_kwargs, moe_info_fields

__all__ = [
    "SUPPORTED_ARCHITECTURES", "ModelConfigError", "ModelDirError", "ModelInfo", "load_model_info",
    "padded_vocab_size", "check_parallel", "transformer_config", "layer_spec", "build_gpt_model", "uses_transformer_engine",
]

# HF `architectures[0]` -> our arch id
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                           **MOE_ARCHES}  # MoE families: models/moe.py


class ModelConfigError(ValueError):
    """The HF config asks for something this provider cannot reproduce exactly, or a bad TP/PP."""


class ModelDirError(FileNotFoundError, ValueError):
    """The model folder (or its config.json) is missing. Catchable as OSError or ValueError."""


@dataclass(frozen=True)
class ModelInfo:
    """The architecture facts read from an HF config: all that the provider and the mapping need."""

    arch: str  # "llama" | "qwen2" | "qwen3"
    hf_architecture: str
    vocab_size: int  # true vocab (rows of HF embed_tokens)
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # HF num_key_value_heads
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    rope_scaling: dict | None = None  # HF rope_parameters/rope_scaling when not "default"
    initializer_range: float = 0.02
    dtype: str = "float32"  # HF config dtype
    make_vocab_size_divisible_by: int = 128
    # MoE (models/moe.py); num_experts=0 is a dense model
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = True
    moe_layers: tuple = ()  # indices of the sparse layers; the others are dense
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0
    moe_shared_expert_size: int = 0
    moe_shared_expert_gate: bool = False

    def __post_init__(self):
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))  # JSON gives a list

    def padded_vocab_size(self, tp: int = 1) -> int:
        return padded_vocab_size(self.vocab_size, tp, self.make_vocab_size_divisible_by)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """Round ``vocab`` up to a multiple of ``multiple * tp`` (Megatron's rule)."""
    if vocab <= 0 or tp <= 0 or multiple <= 0:
        raise ModelConfigError(f"padded_vocab_size needs positive vocab/tp/multiple, got {vocab}/{tp}/{multiple}")
    step = multiple * tp
    return int(math.ceil(vocab / step) * step)


def _rope_params(cfg) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = getattr(cfg, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def load_model_info(model_dir, *, trust_remote_code: bool = False, make_vocab_size_divisible_by: int = 128) -> ModelInfo:
    """Read ``config.json`` of an HF folder (via transformers ``AutoConfig``) into a :class:`ModelInfo`."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"model directory not found: {d}")
    if not (d / "config.json").is_file():
        raise ModelDirError(f"no config.json in {d} (not a Hugging Face model folder)")
    raw = json.loads((d / "config.json").read_text())
    archs = raw.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        found = archs[0] if archs else f"model_type={raw.get('model_type')!r} without 'architectures'"
        raise ModelConfigError(f"unsupported architecture {found} in {d}/config.json; supported: {supported}")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    arch = SUPPORTED_ARCHITECTURES[archs[0]]
    base = base_arch(arch)  # MoE families share their dense family's attention
    where = f"{d}/config.json ({archs[0]})"
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{where}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if getattr(cfg, "use_sliding_window", False):
        raise ModelConfigError(f"{where}: use_sliding_window=True is not supported")
    if base in ("llama", "qwen3") and getattr(cfg, "attention_bias", False):
        raise ModelConfigError(f"{where}: attention_bias=True (bias on o_proj too) is not supported")
    if getattr(cfg, "mlp_bias", False):
        raise ModelConfigError(f"{where}: mlp_bias=True is not supported")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv:
        raise ModelConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    theta, scaling = _rope_params(cfg)
    if scaling is not None:
        _rope_scaling_kwargs(scaling)  # refuse unsupported scaling now, not at model build
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return ModelInfo(
        arch=arch, hf_architecture=archs[0], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers, num_attention_heads=heads,
        num_query_groups=kv, head_dim=head_dim, rms_norm_eps=float(cfg.rms_norm_eps), rope_theta=theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=base == "qwen2", qk_layernorm=base == "qwen3", rope_scaling=scaling,
        initializer_range=float(getattr(cfg, "initializer_range", 0.02)),
        dtype=str(dtype).replace("torch.", ""), make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        **moe_info_fields(cfg, arch, where),
    )


def _rope_scaling_kwargs(scaling: dict | None) -> dict:
    """GPTModel kwargs reproducing HF rope scaling exactly, or ModelConfigError.

    llama3 scaling maps to megatron's ``rope_scaling``/``rope_scaling_factor``; megatron-core 0.16
    hard-codes low/high freq factors and the original context (the defaults of
    ``RotaryEmbedding._apply_scaling``), so any other value is refused. Linear scaling maps to
    ``seq_len_interpolation_factor``.
    """
    if not scaling:
        return {}
    from megatron.core.models.gpt import GPTModel

    gpt_params = inspect.signature(GPTModel.__init__).parameters
    kind = scaling.get("rope_type")
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    if kind == "llama3" and "rope_scaling" in gpt_params and "rope_scaling_factor" in gpt_params:
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        fixed = {k: p.default for k, p in inspect.signature(RotaryEmbedding._apply_scaling).parameters.items()
                 if k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for key, default in fixed.items():
            if key in scaling and float(scaling[key]) != float(default):
                raise ModelConfigError(
                    f"llama3 rope scaling {key}={scaling[key]} is not supported by this megatron-core "
                    f"(it fixes {key}={default})")
        return {"rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}
    raise ModelConfigError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ModelConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[str(dtype)]


def check_parallel(info: ModelInfo, *, tp: int, pp: int) -> None:
    """One-line ModelConfigError when TP/PP cannot split this model (no megatron import: usable for pre-flight)."""
    if tp < 1 or pp < 1:
        raise ModelConfigError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
    for what, n in (("num_attention_heads", info.num_attention_heads), ("num_key_value_heads", info.num_query_groups),
                    ("intermediate_size", info.ffn_hidden_size)):
        if n % tp:
            raise ModelConfigError(
                f"tensor parallel size {tp} does not divide {what}={n} of {info.hf_architecture}"
                + (" (megatron-core cannot replicate KV heads across TP ranks)" if what == "num_key_value_heads" else ""))
    if info.num_layers % pp:
        raise ModelConfigError(f"pipeline parallel size {pp} does not divide num_hidden_layers={info.num_layers}")


def transformer_config(info: ModelInfo, *, tp: int = 1, pp: int = 1, dtype="float32", sequence_parallel: bool = False,
                       recompute: str | None = None, recompute_method: str = "uniform", recompute_num_layers: int = 1,
                       perform_initialization: bool = True, te: bool | None = None, ep: int | None = None,
                       **overrides: Any):
    """A megatron ``TransformerConfig`` for ``info`` at TP=``tp``, PP=``pp``.

    ``recompute``: None, "selective" (attention core) or "full" (whole layers, ``recompute_method`` /
    ``recompute_num_layers``). ``sequence_parallel`` only takes effect with tp > 1 (the local spec's
    norms then come from ``models/norms.py``; sequence lengths must be padded to a multiple of tp).
    ``overrides`` are passed to ``TransformerConfig`` as keywords (unknown names are refused by it).
    ``ep``: expert parallel size (default: megatron's parallel state, else 1).
    """
    from megatron.core.transformer import TransformerConfig

    check_parallel(info, tp=tp, pp=pp)
    if recompute not in (None, "selective", "full"):
        raise ModelConfigError(f"recompute={recompute!r} is not one of None, 'selective', 'full'")
    dt = _as_dtype(dtype)
    kwargs = dict(
        num_layers=info.num_layers, hidden_size=info.hidden_size, ffn_hidden_size=info.ffn_hidden_size,
        num_attention_heads=info.num_attention_heads, num_query_groups=info.num_query_groups,
        kv_channels=info.head_dim, normalization="RMSNorm", layernorm_epsilon=info.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=info.qkv_bias, qk_layernorm=info.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=info.initializer_range, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=bool(sequence_parallel and tp > 1), params_dtype=dt, pipeline_dtype=dt,
        bf16=dt == torch.bfloat16, fp16=dt == torch.float16, attention_softmax_in_fp32=True,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=perform_initialization,
    )
    kwargs.update(moe_config_kwargs(info, ep=_expert_parallel_size(info, tp, ep)))
    if recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method=recompute_method,
                      recompute_num_layers=recompute_num_layers)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _expert_parallel_size(info: ModelInfo, tp: int, ep: int | None) -> int:
    if ep is None:
        from megatron.core import parallel_state as ps

        ep = ps.get_expert_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    check_moe_parallel(info, tp=tp, ep=ep)
    return ep


def uses_transformer_engine(te: bool | None = None) -> bool:
    """True when the TE layer spec should be used (TE importable on this machine, unless forced)."""
    if te is not None:
        return te
    from megatron_grpo.platform import detect

    return detect().transformer_engine


def layer_spec(info: ModelInfo, *, te: bool | None = None):
    """TransformerEngine layer spec when TE loads (norms fuse into linears), megatron's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if uses_transformer_engine(te):
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=None, moe_grouped_gemm=False, qk_layernorm=info.qk_layernorm)
    kwargs = dict(num_experts=None, moe_grouped_gemm=False, qk_layernorm=info.qk_layernorm)
    if "normalization" in inspect.signature(specs.get_gpt_layer_local_spec).parameters:
        kwargs["normalization"] = "RMSNorm"
    return specs.get_gpt_layer_local_spec(**kwargs)


def _cast_float_params(model, dtype) -> None:
    """Every fp32 parameter in ``params_dtype`` (what Megatron-LM's Float16Module does for bf16/fp16): the
    local spec's torch norms ignore ``params_dtype`` and stayed fp32, and megatron-core's mixed-precision
    optimizer cannot checkpoint fp32 parameters beside bf16 ones ("Param id N does not match any model
    sharded param"). Its fp32 main parameters keep the precision of the update."""
    if dtype == torch.float32:
        return
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype)


def build_gpt_model(info: ModelInfo, config, *, pre_process: bool | None = None, post_process: bool | None = None,
                    padded_vocab_size: int | None = None, te: bool | None = None, vp_stage: int | None = None,
                    parallel_output: bool = True):
    """A ``GPTModel`` chunk for this rank's pipeline stage (pre/post_process default from parallel state).

    ``padded_vocab_size`` defaults to ``info.padded_vocab_size(tp)``; pass a checkpoint's value to load
    a checkpoint written with a different padding. ``parallel_output=True`` keeps logits vocab-sharded
    over TP (``[b, s, padded_vocab/tp]``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = config.tensor_model_parallel_size
    vocab = padded_vocab_size or info.padded_vocab_size(tp)
    if vocab < info.vocab_size or vocab % tp:
        raise ModelConfigError(f"padded vocab {vocab} must be >= vocab {info.vocab_size} and divisible by tp={tp}")
    stage = {"ignore_virtual": False, "vp_stage": vp_stage} if vp_stage is not None else {}
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(**stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(**stage)
    spec = (moe_block_spec(info, config, te=uses_transformer_engine(te), vp_stage=vp_stage)
            if info.num_experts else layer_spec(info, te=te))
    if config.sequence_parallel and not uses_transformer_engine(te):  # local spec: norms marked for SP
        from megatron_grpo.models.norms import sequence_parallel_spec

        spec = sequence_parallel_spec(spec, config, vp_stage=vp_stage)
    kwargs = dict(
        config=config, transformer_layer_spec=spec, vocab_size=vocab,
        max_sequence_length=info.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=parallel_output, share_embeddings_and_output_weights=info.tie_word_embeddings,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=info.rope_theta,
    )
    kwargs.update(_rope_scaling_kwargs(info.rope_scaling))
    if vp_stage is not None and "vp_stage" in inspect.signature(GPTModel.__init__).parameters:
        kwargs["vp_stage"] = vp_stage
    model = GPTModel(**kwargs)
    _cast_float_params(model, config.params_dtype)
    model.megatron_grpo_info = info  # lets loaders/exporters find the mapping facts from the module
    return model
