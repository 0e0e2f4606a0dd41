"""The one call the trainer makes per micro-batch: GRPO loss + combinable metrics."""
from __future__ import annotations

import torch

from ._common import as_bool_mask, compute_dtype
from .aggregation import aggregate
from .kl import kl_estimate
from .metrics import advantage_metrics, masked_stats
from .mismatch import rollout_mismatch_metrics
from .policy_loss import policy_loss

__all__ = ["grpo_loss"]


def grpo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    normalizer,
    ref_logprobs=None,
    rollout_logprobs=None,
    entropy=None,
    agg_mode="token-mean",
    eps_low=0.2,
    eps_high=None,
    dual_clip=None,
    kl_coef=0.0,
    kl_kind="k3",
    kl_clamp=10.0,
    is_level=None,
    is_cap=2.0,
    entropy_coef=0.0,
    policy_loss_kind="ppo_clip",
):
    """Scalar GRPO loss of one micro-batch and its metrics.

    Per token: ``policy_loss`` (``policy_loss_kind`` ppo_clip / gspo / cispo, dual clip,
    truncated IS, see :func:`policy_loss`) ``- entropy_coef * entropy + kl_coef * kl_estimate(logprobs,
    ref_logprobs, kind=kl_kind, clamp=kl_clamp)``; the IS weight multiplies the
    policy-gradient term only (as in veRL).  The sum is
    aggregated with ``agg_mode`` and the GLOBAL ``normalizer`` (see
    :func:`loss_normalizer`), so micro-batch losses add up to the full-batch loss.

    ``old_logprobs=None`` means on-policy (``logprobs.detach()``: ratio 1, pure
    policy gradient).  ``kl_coef > 0`` needs ``ref_logprobs``; ``is_level`` needs
    ``rollout_logprobs``.  ``logprobs`` keeps its graph; every other tensor input is
    treated as a constant except ``entropy`` (its gradient flows when
    ``entropy_coef != 0``).

    Returns ``(loss, metrics)``: ``metrics`` is a flat dict of detached 0-dim tensors
    whose key suffix says how to reduce it (see :mod:`.metrics`).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    m = as_bool_mask(mask, logprobs.shape)
    dtype = compute_dtype(logprobs, old_logprobs)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    pg, info = policy_loss(
        logprobs, old_logprobs, advantages, m,
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        rollout_logprobs=rollout_logprobs, is_level=is_level, is_cap=is_cap, kind=policy_loss_kind,
    )
    per_token = pg
    ent = None
    if entropy is not None:
        if entropy.shape != logprobs.shape:
            raise ValueError(f"entropy {tuple(entropy.shape)} must match logprobs {tuple(logprobs.shape)}")
        ent = torch.where(m, entropy.to(dtype), zero)
    if entropy_coef != 0.0:
        if ent is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy")
        per_token = per_token - entropy_coef * ent
    kl_t = None
    if ref_logprobs is not None:
        # Garbage at padding must not reach exp() in k3 or its gradient.
        lp = torch.where(m, logprobs.to(dtype), zero)
        rp = torch.where(m, ref_logprobs.detach().to(dtype), zero)
        kl_t = torch.where(m, kl_estimate(lp, rp, kind=kl_kind, clamp=kl_clamp), zero)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl_t
    loss = aggregate(per_token, m, agg_mode, normalizer)

    with torch.no_grad():
        met = {"loss_sum": loss.detach(), "pg_loss_sum": aggregate(pg.detach(), m, agg_mode, normalizer)}
        met["num_tokens_sum"] = m.sum().to(dtype)
        met["num_seqs_sum"] = m.any(dim=-1).sum().to(dtype)
        ratio = info["ratio"]
        met.update(masked_stats("clip_frac_low", info["clipped_low"], m, moments=False))
        met.update(masked_stats("clip_frac_high", info["clipped_high"], m, moments=False))
        met.update(masked_stats("dual_clip_frac", info["dual_clipped"], m, moments=False))
        met.update(masked_stats("ratio", ratio, m, moments=False, extrema=True))
        # k3 estimate of KL(pi_old || pi) from tokens sampled (approximately) from pi_old.
        met.update(masked_stats("approx_kl_old", ratio - 1.0 - torch.log(ratio), m, moments=False))
        if kl_t is not None:
            met.update(masked_stats("kl_ref", kl_t, m, moments=False))
            met["kl_loss_sum"] = aggregate(kl_t.detach(), m, agg_mode, normalizer)
        if rollout_logprobs is not None:
            # trainer-vs-rollout mismatch (NeMo-RL/veRL metrics; algorithms/mismatch.py)
            met.update(rollout_mismatch_metrics(old_logprobs, rollout_logprobs, m))
        if is_level is not None:
            met.update(masked_stats("is_weight", info["is_weight"], m, moments=False, extrema=True))
            met.update(masked_stats("is_trunc_frac", info["is_truncated"], m, moments=False))
        if ent is not None:
            met.update(masked_stats("entropy", ent.detach(), m, moments=False))
        met.update(advantage_metrics(torch.as_tensor(advantages, device=logprobs.device).detach(), m))
    return loss, met
