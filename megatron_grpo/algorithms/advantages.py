"""Group-relative advantages (GRPO) and KL-in-reward shaping.

GRPO has no critic: the baseline of a completion is the other completions of the
same prompt.  Rewards arrive flat and group-major (the G completions of prompt k are
``rewards[k*G:(k+1)*G]``), the layout TRL, veRL and NeMo-RL all use.

Call these on the *global* rewards of a step (rewards are tiny; gather them first):
``scale="batch"`` divides by the std of whatever batch you pass in.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype

__all__ = ["group_advantages", "kl_in_reward"]

_SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, *, scale="group", leave_one_out=False, eps=1e-6):
    """Per-completion advantages from group-major scalar rewards.

    ``centered_i = r_i - mean_g`` (or, with ``leave_one_out``, ``r_i - mean of the
    other G-1 rewards`` = ``G/(G-1) * (r_i - mean_g)``, the RLOO baseline).  Then:

    * ``scale="group"``: divide by ``std_g + eps`` where ``std_g`` is the *unbiased*
      (Bessel, ``/(G-1)``) std of the group's G rewards, as TRL / Open R1 do
      (``torch.std`` default).  The same group std is used with leave-one-out.
    * ``scale="batch"``: divide by ``std + eps``, the unbiased std of all rewards
      passed in (TRL ``scale_rewards="batch"``).
    * ``scale="none"``: no division (Dr.GRPO: the std division biases towards
      too-easy / too-hard prompts).

    A group whose rewards are all equal gets exactly 0 (never NaN), for every
    scale and for ``leave_one_out``, even with ``eps=0``; the mean of equal floats is
    not always bit-equal to them, so this is enforced explicitly.

    Returns a tensor shaped like ``rewards`` (fp32 or wider, on the same device).
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (a group-relative baseline needs at least two "
            f"completions per prompt), got {group_size}"
        )
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups*group_size], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if n == 0 or n % group_size != 0:
        raise ValueError(
            f"len(rewards)={n} is not a positive multiple of group_size={group_size}; "
            f"rewards must be group-major with exactly group_size completions per prompt"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.to(compute_dtype(rewards))
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf; fix the reward function (or map None to 0) first")

    g = r.view(-1, group_size)
    constant = (g.amax(dim=1) == g.amin(dim=1)).unsqueeze(1)  # [num_groups, 1]
    mean = g.mean(dim=1, keepdim=True)
    centered = g - mean
    if leave_one_out:
        centered = centered * (group_size / (group_size - 1))
    centered = torch.where(constant, torch.zeros_like(centered), centered)

    if scale == "group":
        denom = g.std(dim=1, keepdim=True) + eps
        # constant groups: centered is 0; use 1 so 0/(0+0) cannot appear.
        denom = torch.where(constant, torch.ones_like(denom), denom)
        adv = centered / denom
    elif scale == "batch":
        denom = r.std() + eps
        if float(denom) == 0.0:  # all rewards equal -> every centered value is already 0
            denom = torch.ones_like(denom)
        adv = centered / denom
    else:
        adv = centered
    return adv.reshape(rewards.shape)


def kl_in_reward(rewards, seq_kl, beta):
    """``r - beta * seq_kl``: fold the KL penalty into the reward (veRL ``use_kl_in_reward``).

    ``seq_kl`` is the per-sequence sum of a per-token estimator (see
    :func:`megatron_grpo.algorithms.sequence_kl`); it is detached because rewards
    carry no gradient.  Use this *instead of* a KL term in the loss, not with it.
    """
    rewards = torch.as_tensor(rewards)
    seq_kl = torch.as_tensor(seq_kl, device=rewards.device)
    if rewards.shape != seq_kl.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and seq_kl {tuple(seq_kl.shape)} must have the same shape")
    dtype = compute_dtype(rewards, seq_kl)
    return rewards.to(dtype) - beta * seq_kl.detach().to(dtype)
