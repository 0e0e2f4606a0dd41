"""Build the run's components from the config: policy stack, rollout engine, weight bridge, data.

Each builder is a thin translation from config sections to the component's own keyword arguments,
so the loop reads as the data flow and the components stay usable without a config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig


def _te_flag(cfg: DictConfig):
    return {"auto": None, "true": True, "false": False}[str(cfg.model.use_transformer_engine).lower()]


def updates_per_step(cfg: DictConfig) -> int:
    return cfg.algorithm.update_epochs * cfg.algorithm.mini_batches


def total_steps(cfg: DictConfig, num_train_prompts: int) -> int:
    """GRPO steps of the run: trainer.max_steps, or epochs x prompts per epoch (whichever ends first)."""
    per_epoch = max(1, num_train_prompts // cfg.algorithm.num_prompts_per_step)
    by_epochs = cfg.trainer.epochs * per_epoch if cfg.trainer.epochs else None
    candidates = [s for s in (cfg.trainer.max_steps, by_epochs) if s]
    return min(candidates)


@dataclass
class PolicyStack:
    chunks: list  # DDP-wrapped model chunks of this rank
    info: object  # models.provider.ModelInfo
    optimizer: object
    scheduler: object
    train_step: object  # training.GRPOTrainStep
    reference: object  # models.reference.ReferencePolicy


def build_policy_stack(cfg: DictConfig, *, num_steps: int) -> PolicyStack:
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config
    from megatron_grpo.models.reference import build_reference
    from megatron_grpo.training.optimizer import build_lr_scheduler, build_optimizer, wrap_model_for_training
    from megatron_grpo.training.step import GRPOTrainStep

    m, o, a = cfg.model, cfg.optimizer, cfg.algorithm
    info = load_model_info(m.path, trust_remote_code=m.trust_remote_code,
                           make_vocab_size_divisible_by=m.make_vocab_size_divisible_by)
    config = transformer_config(
        info, tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dtype=m.dtype, sequence_parallel=m.sequence_parallel,
        recompute=None if m.recompute == "none" else m.recompute, te=_te_flag(cfg))
    model = build_gpt_model(info, config, te=_te_flag(cfg))
    load_hf_weights([model], m.path, info)
    chunks = wrap_model_for_training([model], use_distributed_optimizer=o.use_distributed_optimizer)
    optimizer = build_optimizer(
        chunks, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=o.use_distributed_optimizer, bf16=m.dtype == "bfloat16",
        params_dtype=torch.bfloat16 if m.dtype == "bfloat16" else torch.float32)
    updates = num_steps * updates_per_step(cfg)
    warmup = o.warmup_steps if o.warmup_steps is not None else int(math.floor(o.warmup_ratio * updates))
    scheduler = build_lr_scheduler(optimizer, schedule=o.scheduler, warmup_steps=warmup,
                                   total_steps=updates if o.scheduler != "constant" else None)
    loss = dict(agg_mode=a.loss_agg, eps_low=a.ratio_clip_low, eps_high=a.ratio_clip_high, dual_clip=a.dual_clip,
                kl_coef=0.0 if a.kl_in_reward else a.kl_coef, kl_kind=a.kl_kind, kl_clamp=a.kl_clamp,
                is_level=a.importance_sampling, is_cap=a.importance_sampling_cap, entropy_coef=a.entropy_coef)
    if a.policy_loss != "ppo_clip":  # GSPO / CISPO clip with their own bounds
        loss.update(policy_loss_kind=a.policy_loss, eps_low=a[f"{a.policy_loss}_clip_low"],
                    eps_high=a[f"{a.policy_loss}_clip_high"])
    train_step = GRPOTrainStep(chunks, optimizer, scheduler, micro_batch_size=a.micro_batch_size,
                               temperature=cfg.rollout.temperature, vocab_size=info.vocab_size, loss=loss,
                               max_len=cfg.rollout.max_new_tokens,
                               max_tokens_per_microbatch=a.max_tokens_per_microbatch,
                               routing_replay=a.routing_replay)
    reference = build_reference(chunks, mode=a.reference if a.kl_coef > 0 else "none", kl_coef=a.kl_coef,
                                model_factory=lambda: build_gpt_model(info, config, te=_te_flag(cfg)))
    return PolicyStack(chunks, info, optimizer, scheduler, train_step, reference)


def engine_config(cfg: DictConfig, *, max_model_len: int):
    """The vLLM engine settings of the run (trainer and rollout servers build the same one)."""
    from megatron_grpo.platform import detect
    from megatron_grpo.rollout.config import EngineConfig

    r = cfg.rollout
    cuda = detect().cuda
    return EngineConfig(
        model=str(cfg.model.path), tensor_parallel_size=r.tp,
        dtype="bfloat16" if cfg.model.dtype == "bfloat16" else "float32", max_model_len=max_model_len,
        seed=cfg.trainer.seed, enforce_eager=r.enforce_eager,
        kv_cache_memory_bytes=None if cuda else int(r.kv_cache_memory_mb) << 20,
        gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=cuda and r.placement == "colocated",
        sleep_level=r.sleep_level, capture_routed_experts=cfg.algorithm.routing_replay == "r3")


def build_engine(cfg: DictConfig, *, max_model_len: int):
    import os

    r = cfg.rollout
    ecfg = engine_config(cfg, max_model_len=max_model_len)
    if r.placement == "colocated":
        from megatron_grpo.rollout.engine import ColocatedEngine

        return ColocatedEngine(ecfg)
    if os.environ.get("GRPO_ROLE") == "rollout":  # the CLI runs the rollout server for this role
        raise RuntimeError("GRPO_ROLE=rollout ranks run megatron_grpo.rollout.server, not the trainer's engine")
    transport = "fs" if r.weights_path else "pg"
    if os.environ.get("GRPO_ROLE") == "train":
        from megatron_grpo.rollout.control import transfer_address

        address = transfer_address()
        if address is not None:
            from megatron_grpo.rollout.remote import RemoteEngine, replicas_from_env

            # node split: rollout servers on other nodes connect to this job's rank 0
            return RemoteEngine(ecfg, addr=address[0], port=address[1], replicas=replicas_from_env(r.tp),
                                transport=transport, weights_path=r.weights_path, timeout_s=cfg.parallel.timeout_s)
    from megatron_grpo.rollout.disaggregated import DisaggregatedEngine

    # The driver rank owns vLLM in its own processes (own torch world; own GPUs on CUDA); weights go over
    # a private process group, or through rollout.weights_path on a shared filesystem.
    return DisaggregatedEngine(ecfg, transport=transport, weights_path=r.weights_path,
                               devices=list(r.devices) if r.devices else None)


def sampling_config(cfg: DictConfig, *, n: int):
    from megatron_grpo.rollout.types import SamplingConfig

    r = cfg.rollout
    return SamplingConfig(n=n, temperature=r.temperature, top_p=r.top_p, top_k=max(0, r.top_k),
                          max_tokens=r.max_new_tokens, stop=tuple(r.stop), stop_token_ids=tuple(r.stop_token_ids),
                          include_stop_str_in_output=True, skip_special_tokens=True)


@dataclass
class PromptData:
    train: object  # datasets.Dataset with prompt_ids, solution
    test: object | None
    stats: dict


def load_prompt_data(cfg: DictConfig, tokenizer) -> PromptData:
    from megatron_grpo.data.loading import load_prompt_dataset
    from megatron_grpo.data.prompts import tokenize_prompts

    d = cfg.data
    splits = load_prompt_dataset(d.path, problem_column=d.prompt_column, solution_column=d.solution_column,
                                 train_split=d.train_split, test_split=d.test_split,
                                 test_fraction=d.test_fraction or None, seed=d.seed, on_bad_row=d.on_bad_row,
                                 subset=d.subset)
    train, tstats = tokenize_prompts(splits.train, tokenizer, system_prompt=d.system_prompt,
                                     max_prompt_length=d.max_prompt_length, split_name="train")
    test = None
    if splits.test is not None:
        test, _ = tokenize_prompts(splits.test, tokenizer, system_prompt=d.system_prompt,
                                   max_prompt_length=d.max_prompt_length, split_name="test")
    if len(train) < cfg.algorithm.num_prompts_per_step:
        raise ValueError(f"data.path {d.path}: {len(train)} usable train prompts < algorithm.num_prompts_per_step="
                         f"{cfg.algorithm.num_prompts_per_step}")
    return PromptData(train=train, test=test, stats={**splits.stats, **{f"train_{k}": v for k, v in tstats.items()}})


def context_length(model_dir, needed: int, *, what: str = "prompt + completion length") -> int:
    """vLLM's max_model_len: what the run needs, checked against the model's position limit."""
    import json

    limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings") or needed
    if needed > limit:
        raise ValueError(f"{what} = {needed} exceeds the model's max_position_embeddings {limit}")
    return needed


def max_model_len(cfg: DictConfig) -> int:
    return context_length(cfg.model.path, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                          what="data.max_prompt_length + rollout.max_new_tokens")
