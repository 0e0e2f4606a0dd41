"""Per-token KL estimators between the policy and the reference (Schulman's k1/k2/k3).

Tokens are sampled from the policy, so each estimator estimates KL(pi || ref):
k1 is unbiased but high-variance and can be negative, k2 is biased and low-variance,
k3 (GRPO / DeepSeek-R1, veRL ``low_var_kl``) is unbiased and always >= 0.
"""
from __future__ import annotations

import torch

from ._common import as_bool_mask, compute_dtype

__all__ = ["KL_KINDS", "kl_estimate", "sequence_kl"]

# Canonical kinds plus the names veRL users know (``kl_penalty`` / ``kl_loss_type``).
KL_KINDS = {
    "k1": "k1", "kl": "k1",
    "k2": "k2", "mse": "k2",
    "k3": "k3", "low_var_kl": "k3",
    "abs": "abs",
}


def _canonical(kind: str) -> str:
    try:
        return KL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {sorted(KL_KINDS)}") from None


def kl_estimate(logprobs, ref_logprobs, *, kind="k3", clamp=10.0):
    """Per-token KL estimate, elementwise, same shape as the inputs.

    With ``d = logprobs - ref_logprobs`` (log pi - log ref):

    * ``k1`` (alias ``kl``): ``d``
    * ``k2`` (alias ``mse``): ``0.5 * d**2``
    * ``k3`` (alias ``low_var_kl``): ``exp(-d) - (-d) - 1``, i.e.
      ``exp(ref - pi) - (ref - pi) - 1``; the log-ratio ``ref - pi`` is clamped to
      ``[-clamp, clamp]`` first so exp cannot overflow (gradient is 0 beyond the
      clamp).  ``clamp=None`` disables the clamp.  Unlike veRL we do not also clamp
      the k3 *value* to [-10, 10].
    * ``abs``: ``|d|`` (veRL's ``abs``; a diagnostic more than a penalty).

    Result dtype is at least fp32.  Masking is the caller's job (see
    :func:`sequence_kl` / the loss aggregation).
    """
    canon = _canonical(kind)
    dtype = compute_dtype(logprobs, ref_logprobs)
    d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if canon == "k1":
        return d
    if canon == "k2":
        return 0.5 * d.square()
    if canon == "abs":
        return d.abs()
    log_ratio = -d  # log(ref / pi)
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0 or None, got {clamp}")
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(log_ratio) - log_ratio - 1.0


def sequence_kl(logprobs, ref_logprobs, mask, *, kind="k1", clamp=10.0):
    """Per-sequence KL ``[B]``: masked sum over tokens of :func:`kl_estimate`.

    This is the ``seq_kl`` that :func:`kl_in_reward` expects (k1 by default, as veRL's
    KL-in-reward does).  Padding positions contribute exactly 0 even if they hold
    garbage (NaN/inf) logprobs.  Detached: it feeds rewards, not gradients.
    """
    m = as_bool_mask(mask, logprobs.shape)
    with torch.no_grad():
        dtype = compute_dtype(logprobs, ref_logprobs)
        lp = torch.where(m, logprobs.to(dtype), torch.zeros((), dtype=dtype, device=logprobs.device))
        rp = torch.where(m, ref_logprobs.to(dtype), torch.zeros((), dtype=dtype, device=logprobs.device))
        per_tok = kl_estimate(lp, rp, kind=kind, clamp=clamp)
        return torch.where(m, per_tok, torch.zeros_like(per_tok)).sum(dim=-1)
