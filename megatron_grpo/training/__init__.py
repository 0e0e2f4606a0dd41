"""GRPO training on a Megatron policy: DDP + optimizer + LR schedule set up for exact loss sums,
the GRPO batch layout, and the guarded optimizer step (see ``step.py`` for the exactness argument)."""
from .batch import GRPOBatch
from .optimizer import (
    LR_SCHEDULES,
    build_lr_scheduler,
    build_optimizer,
    finalize_model_grads_summed,
    wrap_model_for_training,
)
from .step import GRPOTrainStep

__all__ = [
    "GRPOBatch",
    "GRPOTrainStep",
    "LR_SCHEDULES",
    "build_lr_scheduler",
    "build_optimizer",
    "finalize_model_grads_summed",
    "wrap_model_for_training",
]
