"""Megatron DDP wrapping, the Megatron optimizer and the LR schedule, configured for exact GRPO sums.

Why ``calculate_per_token_loss=True``: our micro-batch losses are already divided by the GLOBAL
normaliser (``algorithms.loss_normalizer`` summed over all micro-batches and DP ranks), so the
full-batch gradient is the plain SUM of micro-batch and DP-rank gradients. With this flag
megatron-core (0.16 and 0.19)

* does not divide the loss returned by ``loss_func`` by ``num_microbatches`` / ``num_tokens``
  (``schedules.forward_step_calc_loss``), and
* builds DDP with ``gradient_scaling_factor = 1``: gradients are SUMMED over DP, not averaged.

The one thing it would still do is divide all gradients by the token count summed over the
micro-batches in ``finalize_model_grads(model, num_tokens)``; :func:`finalize_model_grads_summed`
calls megatron's ``finalize_model_grads`` with ``num_tokens=None`` (DP all-reduce, tied/position
embedding and layer-norm all-reduces unchanged). The flag must be set before DDP is built (DDP
reads it in its constructor), hence one function that does both.

All megatron-core calls use keyword arguments only (0.16 vs 0.19 positional orders differ).
"""
from __future__ import annotations

import torch

__all__ = [
    "finalize_model_grads_summed",
    "wrap_model_for_training",
    "build_optimizer",
    "build_lr_scheduler",
    "LR_SCHEDULES",
]

LR_SCHEDULES = ("constant", "linear", "cosine")


def finalize_model_grads_summed(model, num_tokens=None, **kwargs):
    """megatron's ``finalize_model_grads`` without the 1/num_tokens rescale (see module doc)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


def _model_config(chunk):
    from megatron.core.utils import get_model_config

    return get_model_config(chunk)


def wrap_model_for_training(
    model_chunks,
    *,
    use_distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
):
    """Wrap bare GPTModel chunks in Megatron DDP, configured for summed (exactly normalised) grads.

    Sets on the shared ``TransformerConfig``: ``calculate_per_token_loss = True`` and
    ``finalize_model_grads_func = finalize_model_grads_summed``. Returns the list of DDP chunks.
    ``use_distributed_optimizer`` must match :func:`build_optimizer` (ZeRO-1: grads reduce-scattered,
    optimizer state and fp32 main params sharded over DP, params all-gathered after the update).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    config = _model_config(chunks[0])
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads_summed
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
        average_in_collective=False,  # sum, not mean (asserted by DDP with per-token loss)
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # Megatron-LM convention: only the first chunk is bucketed when there are several.
            disable_bucketing=i > 0,
        ))
    return wrapped


def build_optimizer(
    ddp_chunks,
    *,
    lr: float,
    min_lr: float | None = None,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    bf16: bool = False,
    params_dtype: torch.dtype = torch.float32,
    optimizer: str = "adam",
):
    """``get_megatron_optimizer`` for DDP chunks (Adam = AdamW with decoupled weight decay).

    ``bf16=True``: bf16 model params with fp32 main params/grads in the optimizer. ``clip_grad``
    is the global grad-norm threshold (0 disables); the GRPO step applies it itself so that it can
    skip non-finite steps (see ``training.step``). Also sets ``config.grad_scale_func`` (identity
    unless fp16 loss scaling is used).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    chunks = list(ddp_chunks) if isinstance(ddp_chunks, (list, tuple)) else [ddp_chunks]
    opt_config = OptimizerConfig(
        optimizer=optimizer, lr=lr, min_lr=min_lr if min_lr is not None else 0.0,
        weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2, adam_eps=adam_eps,
        clip_grad=clip_grad, use_distributed_optimizer=use_distributed_optimizer, bf16=bf16,
        params_dtype=params_dtype,
    )
    opt = get_megatron_optimizer(config=opt_config, model_chunks=chunks)
    _model_config(chunks[0]).grad_scale_func = opt.scale_loss
    return opt


def build_lr_scheduler(
    optimizer,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
):
    """Megatron's ``OptimizerParamScheduler``: linear warmup from 0, then constant/linear/cosine.

    Peak lr, ``min_lr`` and weight decay come from the optimizer's ``OptimizerConfig`` (Megatron's
    param groups carry them, and they would override anything passed here). After ``s`` applied
    updates the lr is ``lr * s / warmup_steps`` during warmup (the first update has lr 0 when
    ``warmup_steps > 0``, as in HF/TRL schedules), then constant, or decaying to ``min_lr`` at
    ``total_steps`` (linear/cosine). The GRPO step calls ``scheduler.step(increment=1)`` after each
    applied update and not after a skipped one.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {LR_SCHEDULES}")
    if schedule != "constant" and not total_steps:
        raise ValueError(f"schedule={schedule!r} needs total_steps")
    if warmup_steps < 0 or (total_steps and warmup_steps >= total_steps):
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
    cfg = optimizer.config
    lr, min_lr = float(cfg.lr), float(cfg.min_lr or 0.0)
    decay_steps = int(total_steps) if total_steps else warmup_steps + 1
    return OptimizerParamScheduler(
        optimizer=optimizer,
        init_lr=0.0 if warmup_steps > 0 else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
