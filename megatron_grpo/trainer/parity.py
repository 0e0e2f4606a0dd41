"""The step-1 check that the trainer and vLLM hold the same weights (Megatron vs vLLM logprobs).

Statistics and per-dtype limits: ``algorithms/mismatch.py``. The check reduces the statistics over
the world (TP peers hold the same rows; a stage without logprobs adds nothing), so every rank takes the
same decision and
a failure is one ``error:`` line from rank 0 (``LogprobParityError`` is a ``ValueError``: the CLI
reports it and exits 2), not a traceback on every rank.
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_grpo.algorithms import (
    MISMATCH_LIMITS,
    MismatchLimits,
    finalize_metrics,
    mismatch_violations,
    pack_metrics,
    rollout_mismatch_metrics,
    unpack_metrics,
)

__all__ = ["LogprobParityError", "parity_limits", "rollout_parity_stats", "check_rollout_parity"]

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class LogprobParityError(ValueError):
    """Trainer and rollout logprobs of the sampled tokens disagree beyond rounding."""


def parity_limits(cfg) -> MismatchLimits:
    """``trainer.logprob_check_mean_abs`` / ``_ratio_outside``, each defaulting (null) per ``model.dtype``."""
    t = cfg.trainer
    default = MISMATCH_LIMITS[str(cfg.model.dtype)]
    mean_abs = t.get("logprob_check_mean_abs")
    outside = t.get("logprob_check_ratio_outside")
    return MismatchLimits(mean_abs=default.mean_abs if mean_abs is None else float(mean_abs),
                          ratio_outside_frac=default.ratio_outside_frac if outside is None else float(outside))


def rollout_parity_stats(old_lp, rollout_lp, mask, *, group=None) -> dict:
    """Finalized mismatch statistics over this DP group's sampled tokens (same dict on every rank)."""
    packed = pack_metrics(rollout_mismatch_metrics(old_lp, rollout_lp, mask))
    if dist.is_initialized():
        for op, (_, tensor) in packed.items():
            dist.all_reduce(tensor, op=_OPS[op], group=group)
    return finalize_metrics(unpack_metrics(packed))


def check_rollout_parity(cfg, old_lp, rollout_lp, mask, *, log=print) -> dict:
    """Step 1: compare the trainer's logprobs of the sampled tokens with vLLM's (same weights).

    Raises :class:`LogprobParityError` when the mean |Δlogprob| or the share of tokens whose
    probability ratio leaves [1/2, 2] is above its limit, or when ``trainer.logprob_check_tolerance``
    (optional max-abs limit, off by default) is exceeded. Returns the statistics.
    """
    r = cfg.rollout
    if r.top_p < 1.0 or r.top_k > 0:
        return {}  # processed logprobs include top-p/top-k renormalisation: not comparable
    if old_lp is None:  # a non-last pipeline stage (on-policy: the training forward's logprobs): no tokens
        old_lp, mask = rollout_lp, mask.new_zeros(mask.shape)
    # over the whole world: non-last PP stages contribute nothing, TP peers count the same rows equally
    # often (means and shares unchanged), so every rank takes the same decision
    stats = rollout_parity_stats(old_lp, rollout_lp, mask)
    if "rollout_logprob_abs_diff" not in stats:
        return stats  # no sampled token (all masked)
    limits = parity_limits(cfg)
    # the line ends with ": <max abs>" as before (scripts parse it); the checked statistics come first
    log(f"step-1 logprob parity ({cfg.model.dtype} mean |Δ| {stats['rollout_logprob_abs_diff']:.2e} limit "
        f"{limits.mean_abs:g}, ratio outside [0.5, 2] {stats['rollout_ratio_outside_frac']:.2e} limit "
        f"{limits.ratio_outside_frac:g}; Megatron vs vLLM, max abs over sampled tokens): "
        f"{stats['rollout_logprob_abs_diff_max']:.2e}")
    bad = mismatch_violations(stats, limits)
    max_abs = cfg.trainer.get("logprob_check_tolerance")
    if max_abs is not None and not stats["rollout_logprob_abs_diff_max"] <= float(max_abs):
        bad.append(f"max |Δ|={stats['rollout_logprob_abs_diff_max']:.3g} > trainer.logprob_check_tolerance={max_abs:g}")
    if bad:
        raise LogprobParityError(
            f"Megatron and vLLM logprobs of the step-1 samples differ beyond {cfg.model.dtype} rounding: "
            f"{', '.join(bad)} (limits: trainer.logprob_check_mean_abs / logprob_check_ratio_outside): the weight "
            "sync or the model mapping is wrong; run `megatron-grpo doctor`")
    return stats
