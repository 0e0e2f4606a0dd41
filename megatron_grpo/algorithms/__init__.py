"""GRPO mathematics as pure torch functions (no process groups, no config objects).

One module per concern: advantages, KL estimators, the per-token policy loss, loss
aggregation (exact under micro-batching / DP), the per-micro-batch ``grpo_loss`` and
metrics that reduce exactly across shards.  Reference: README "Public API".
"""
from .advantages import group_advantages, kl_in_reward
from .aggregation import AGG_MODES, aggregate, loss_normalizer
from .grpo_loss import grpo_loss
from .kl import KL_KINDS, kl_estimate, sequence_kl
from .metrics import (
    advantage_metrics,
    combine_metrics,
    finalize_metrics,
    masked_stats,
    metric_reduce_op,
    pack_metrics,
    unpack_metrics,
)
from .mismatch import MISMATCH_LIMITS, MismatchLimits, mismatch_violations, rollout_mismatch_metrics
from .policy_loss import IS_LEVELS, POLICY_LOSSES, policy_loss, truncated_is_weights

__all__ = [
    "group_advantages",
    "kl_in_reward",
    "kl_estimate",
    "sequence_kl",
    "truncated_is_weights",
    "policy_loss",
    "loss_normalizer",
    "aggregate",
    "grpo_loss",
    "metric_reduce_op",
    "combine_metrics",
    "pack_metrics",
    "unpack_metrics",
    "finalize_metrics",
    "masked_stats",
    "advantage_metrics",
    "rollout_mismatch_metrics",
    "mismatch_violations",
    "MismatchLimits",
    "MISMATCH_LIMITS",
    "AGG_MODES",
    "KL_KINDS",
    "IS_LEVELS",
    "POLICY_LOSSES",
]
