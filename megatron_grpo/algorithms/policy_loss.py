"""Per-token policy losses: clipped surrogate (PPO/GRPO), GSPO's sequence-level ratio, CISPO's
clipped stop-gradient IS weight; dual clip, truncated IS and entropy bonus.

Everything here is per token (``[B, T]``); turning it into a scalar is
:mod:`.aggregation`'s job so that micro-batching stays exact.
"""
from __future__ import annotations

import torch

from ._common import as_bool_mask, compute_dtype

__all__ = ["IS_LEVELS", "POLICY_LOSSES", "truncated_is_weights", "policy_loss"]

IS_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")


def truncated_is_weights(old_logprobs, rollout_logprobs, mask, *, level="token", cap=2.0):
    """Importance weights correcting the rollout engine (vLLM) vs trainer mismatch.

    The rollout was sampled from ``pi_rollout`` (vLLM's numerics) but the loss assumes
    ``pi_old`` (the trainer's recomputed logprobs), so each token's loss is multiplied
    by ``w = pi_old / pi_rollout`` truncated at ``cap`` (veRL / NeMo-RL "TIS"):

    * ``level="token"``: ``w_t = min(exp(old_t - rollout_t), cap)``.
    * ``level="sequence"``: one weight per sequence, the *product* of the token ratios
      over its valid tokens, ``min(exp(sum_t mask*(old_t - rollout_t)), cap)`` (veRL's
      sequence level; not the geometric mean), broadcast to the sequence's tokens.

    ``cap=None`` disables truncation (plain IS; may explode).  Returns
    ``(weights, truncated)``, both ``[B, T]``: detached weights (0 at padding) and a
    bool mask of valid tokens whose raw weight exceeded ``cap``.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"is level must be one of {IS_LEVELS}, got {level!r}")
    if cap is not None and not cap > 0:
        raise ValueError(f"is cap must be > 0 or None, got {cap}")
    if old_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)} and rollout_logprobs "
            f"{tuple(rollout_logprobs.shape)} must have the same shape"
        )
    m = as_bool_mask(mask, old_logprobs.shape)
    with torch.no_grad():
        dtype = compute_dtype(old_logprobs, rollout_logprobs)
        zero = torch.zeros((), dtype=dtype, device=old_logprobs.device)
        log_w = torch.where(m, old_logprobs.to(dtype) - rollout_logprobs.to(dtype), zero)
        if level == "sequence":
            log_w = log_w.sum(dim=-1, keepdim=True).expand_as(log_w)
        w = torch.exp(log_w)  # may be inf at sequence level; min(inf, cap) = cap
        if cap is not None:
            truncated = m & (w > cap)
            w = w.clamp(max=cap)
        else:
            truncated = torch.zeros_like(m)
        w = torch.where(m, w, zero)
    return w, truncated


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    eps_low=0.2,
    eps_high=None,
    dual_clip=None,
    rollout_logprobs=None,
    is_level=None,
    is_cap=2.0,
    entropy=None,
    entropy_coef=0.0,
    log_ratio_clamp=20.0,
    kind="ppo_clip",
):
    """Per-token GRPO/PPO policy loss ``[B, T]`` (0 at padding) and per-token diagnostics.

    ``ratio = exp(logprobs - old_logprobs)`` (log-ratio clamped to
    ``+-log_ratio_clamp`` before exp, like veRL, so a wild token cannot make inf;
    ``None`` disables) and

    ``loss_t = -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A)``

    (``eps_high=None`` means ``eps_low``; a larger ``eps_high`` is DAPO clip-higher).
    Dual clip (``dual_clip=c > 1``): for ``A < 0`` the loss is capped at ``-c*A`` so a
    huge ratio on a bad token cannot blow up the step.  Truncated IS
    (``is_level="token"|"sequence"``, needs ``rollout_logprobs``) multiplies the
    clipped loss by :func:`truncated_is_weights`.  Finally
    ``loss_t -= entropy_coef * entropy_t`` (entropy is given per token, keeps its grad).

    ``kind`` picks the objective (all per token, so aggregation stays exact under
    micro-batching; a row is one whole sequence):

    * ``"ppo_clip"``: the clipped surrogate above.
    * ``"gspo"`` (GSPO paper's GSPO-token, veRL ``gspo``, TRL
      ``importance_sampling_level="sequence"``): the same clipped surrogate with the
      sequence ratio ``s = exp(mean over valid tokens of (logprobs - old))`` on every
      token, as ``s_t = sg[s] * exp(logprobs_t - sg[logprobs_t])``: value ``s``,
      gradient ``s * grad(logprobs_t)``; clipping (``eps_low``/``eps_high``, GSPO uses
      ~3e-4/4e-4) therefore acts per sequence.
    * ``"cispo"`` (MiniMax-M1, veRL ``cispo``, TRL ``loss_type="cispo"``):
      ``loss_t = -sg[clip(ratio, 1-eps_low, 1+eps_high)] * A * logprobs_t``: every
      token keeps its gradient, only the IS weight is clipped; ``eps_low=None``
      means no lower bound (MiniMax-M1).  ``dual_clip`` does not apply.

    ``advantages`` is ``[B]`` (one per sequence, broadcast over tokens) or ``[B, T]``.
    Returns ``(loss, info)``; ``info`` holds detached ``[B, T]`` tensors: ``ratio``,
    bool masks ``clipped_low`` (A<0, ratio<1-eps_low), ``clipped_high`` (A>0,
    ratio>1+eps_high), ``dual_clipped`` (A<0, ratio>c), and, when IS is on,
    ``is_weight`` / ``is_truncated``.  Under ``gspo`` ``ratio`` is the sequence ratio
    on each token; under ``cispo`` ``clipped_low``/``clipped_high`` mark tokens whose IS
    weight was clipped (either sign of A).
    """
    if kind not in POLICY_LOSSES:
        raise ValueError(f"policy loss kind must be one of {POLICY_LOSSES}, got {kind!r}")
    if eps_high is None:
        eps_high = eps_low
    if kind == "cispo":
        if eps_high is None or eps_high < 0 or (eps_low is not None and eps_low < 0):
            raise ValueError(f"cispo needs eps_high >= 0 and eps_low >= 0 or None, got eps_low={eps_low}, "
                             f"eps_high={eps_high}")
        if dual_clip is not None:
            raise ValueError("dual_clip does not apply to cispo (its IS weight is already clipped); set it to None")
    elif eps_low is None or not (0 <= eps_low < 1) or eps_high < 0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}")
    if is_level is not None and rollout_logprobs is None:
        raise ValueError("is_level is set but rollout_logprobs is None")
    m = as_bool_mask(mask, logprobs.shape)
    dtype = compute_dtype(logprobs, old_logprobs)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    adv = torch.as_tensor(advantages, device=logprobs.device).to(dtype)
    if adv.dim() == 1:
        if adv.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages [B] has B={adv.shape[0]}, logprobs has B={logprobs.shape[0]}")
        adv = adv.unsqueeze(-1).expand_as(logprobs)
    elif adv.shape != logprobs.shape:
        raise ValueError(f"advantages must be [B] or [B, T]={tuple(logprobs.shape)}, got {tuple(adv.shape)}")
    adv = torch.where(m, adv.detach(), zero)

    # Padding may hold garbage (NaN/inf); zero the log-ratio there so neither the
    # value nor the gradient can be poisoned.
    lp = torch.where(m, logprobs.to(dtype), zero)
    log_ratio = torch.where(m, lp - old_logprobs.detach().to(dtype), zero)
    if kind == "gspo":
        log_ratio = lp - lp.detach() + _sequence_mean(log_ratio.detach(), m)  # value: the sequence's
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)

    neg = adv < 0
    if kind == "cispo":
        low = 0.0 if eps_low is None else 1.0 - eps_low
        weight = ratio.detach().clamp(min=low, max=1.0 + eps_high)
        loss = -adv * weight * lp
    else:
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        loss = torch.maximum(unclipped, clipped)
        if dual_clip is not None:
            loss = torch.where(neg, torch.minimum(loss, -adv * dual_clip), loss)

    info = {}
    if is_level is not None:
        w, truncated = truncated_is_weights(old_logprobs, rollout_logprobs, m, level=is_level, cap=is_cap)
        loss = loss * w.to(dtype)
        info["is_weight"] = w
        info["is_truncated"] = truncated
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy")
        ent = torch.where(m, entropy.to(dtype), zero)
        loss = loss - entropy_coef * ent
    loss = torch.where(m, loss, zero)

    with torch.no_grad():
        r = ratio.detach()
        info["ratio"] = r
        if kind == "cispo":
            info["clipped_low"] = m & (r < (0.0 if eps_low is None else 1.0 - eps_low))
            info["clipped_high"] = m & (r > 1.0 + eps_high)
        else:
            info["clipped_low"] = m & neg & (r < 1.0 - eps_low)
            info["clipped_high"] = m & (adv > 0) & (r > 1.0 + eps_high)
        if dual_clip is not None:
            info["dual_clipped"] = m & neg & (r > dual_clip)
        else:
            info["dual_clipped"] = torch.zeros_like(m)
    return loss, info


def _sequence_mean(per_token, m):
    """Each row's mean over its valid tokens, broadcast back to ``[B, T]`` (0 for an empty row)."""
    n = m.sum(dim=-1, keepdim=True).clamp(min=1).to(per_token.dtype)
    return (per_token.sum(dim=-1, keepdim=True) / n).expand_as(per_token)
