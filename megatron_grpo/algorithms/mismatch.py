"""Trainer-vs-rollout logprob mismatch: the statistics NeMo-RL / veRL users watch, and their limits.

The trainer and vLLM evaluate the same weights with different kernels, so per-token logprobs of the
sampled tokens never agree bit for bit; in bf16 a few tokens near a flat distribution differ by
1e-2 or more while the bulk agrees to ~1e-3. A max-abs check therefore either fails every correct
bf16 run or is too loose to catch anything. Two statistics separate "correct up to rounding" from
"different weights" (a skipped or wrong weight sync, a wrong mapping):

* ``rollout_logprob_abs_diff``: mean over sampled tokens of ``|logprob - rollout_logprob|``
  (``_max`` is logged too, but not checked);
* ``rollout_ratio_outside_frac``: the share of tokens whose probability ratio ``exp(Δ)`` leaves
  ``[1/band, band]`` (``band = 2``: the truncation level of veRL's / TRL's rollout IS correction).

``token_mult_prob_error`` (NeMo-RL: token mean of ``exp(|Δ|)``, 1 = perfect) is logged alongside.
:data:`MISMATCH_LIMITS` holds the per-dtype defaults of the step-1 check; how they were chosen
(measured on correct and deliberately skipped syncs) is in the README's "Logprob parity" section.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import as_bool_mask, compute_dtype
from .metrics import masked_stats

__all__ = ["MismatchLimits", "MISMATCH_LIMITS", "RATIO_BAND", "rollout_mismatch_metrics", "mismatch_violations"]

RATIO_BAND = 2.0


@dataclass(frozen=True)
class MismatchLimits:
    """Upper limits of the two checked statistics (a run passes when both are at or below them)."""

    mean_abs: float  # rollout_logprob_abs_diff
    ratio_outside_frac: float  # rollout_ratio_outside_frac


# Per model dtype; measured values and margins: README "Logprob parity".
MISMATCH_LIMITS = {
    "float32": MismatchLimits(mean_abs=1e-3, ratio_outside_frac=1e-3),
    "bfloat16": MismatchLimits(mean_abs=2e-2, ratio_outside_frac=1e-2),
}


def rollout_mismatch_metrics(logprobs, rollout_logprobs, mask=None, *, band: float = RATIO_BAND) -> dict:
    """Combinable metrics (``*_sum``/``*_count``/``*_max``) of the trainer-vs-rollout mismatch.

    ``logprobs``, ``rollout_logprobs`` ``[B, T]`` (or any equal shapes) of the sampled tokens; ``mask``
    selects the tokens that count. Finalizes to ``rollout_logprob_abs_diff`` (+ ``_max``),
    ``token_mult_prob_error`` and ``rollout_ratio_outside_frac``.
    """
    if band <= 1.0:
        raise ValueError(f"band must be > 1, got {band}")
    with torch.no_grad():
        dtype = compute_dtype(logprobs, rollout_logprobs)
        m = as_bool_mask(mask, logprobs.shape) if mask is not None else torch.ones(logprobs.shape, dtype=torch.bool,
                                                                                   device=logprobs.device)
        zero = torch.zeros((), dtype=dtype, device=logprobs.device)
        diff = torch.where(m, (logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)).abs(), zero)
        met = masked_stats("rollout_logprob_abs_diff", diff, m, moments=False, extrema=True)
        del met["rollout_logprob_abs_diff_min"]
        met.update(masked_stats("token_mult_prob_error", torch.exp(diff), m, moments=False))
        met.update(masked_stats("rollout_ratio_outside_frac", diff > math.log(band), m, moments=False))
    return met


def mismatch_violations(stats: dict, limits: MismatchLimits) -> list[str]:
    """Human-readable ``name=value > limit`` for each finalized statistic above its limit."""
    out = []
    for key, limit in (("rollout_logprob_abs_diff", limits.mean_abs),
                       ("rollout_ratio_outside_frac", limits.ratio_outside_frac)):
        value = stats.get(key)
        if value is not None and not value <= limit:  # NaN fails too
            out.append(f"{key}={value:.3g} > {limit:g}")
    return out
