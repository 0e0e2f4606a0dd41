"""Loss aggregation that is exact under micro-batching, grad accumulation and DP.

Every mode is ``numerator(micro-batch) / N_global`` where the numerator is a plain
sum over the micro-batch's sequences.  So if each micro-batch divides by the
*global* normaliser (not its own), summing micro-batch losses (grad accumulation)
and summing gradients over DP ranks reproduces the full-batch loss and gradient
exactly.  Dividing by a local normaliser (the classic bug) re-weights tokens by the
size of the micro-batch they happened to land in.

Usage::

    n = sum(loss_normalizer(mb.mask, mode) for mb in my_micro_batches)
    n = all_reduce(n, SUM over the data-parallel group)          # caller's job
    for mb in my_micro_batches:
        aggregate(per_token_loss(mb), mb.mask, mode, n).backward()
    # then SUM (not average) gradients across DP ranks, or multiply the
    # averaged gradients by the DP world size.
"""
from __future__ import annotations

import torch

from ._common import as_bool_mask, compute_dtype

__all__ = ["AGG_MODES", "loss_normalizer", "aggregate"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_mode(mode):
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")


def loss_normalizer(mask, mode="token-mean", max_len=None):
    """This shard's contribution to the global normaliser, an int64 0-dim tensor.

    Sum it over all micro-batches and DP ranks to get the ``normalizer`` for
    :func:`aggregate`.  ``mask`` is ``[B, T]`` (nonzero = completion token).

    * ``token-mean``: number of valid tokens.
    * ``seq-mean-token-mean`` / ``seq-mean-token-sum``: number of sequences with at
      least one valid token (all-padding rows, e.g. micro-batch filler, do not count).
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): that sequence count times ``max_len``, a
      constant (use the max completion length of the run, not of the batch).

    Integers keep the count exact (fp32 stops being exact at 2**24 tokens).
    """
    _check_mode(mode)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m = as_bool_mask(mask, mask.shape)
    if mode == "token-mean":
        return m.sum(dtype=torch.int64)
    n_seq = m.any(dim=-1).sum(dtype=torch.int64)
    if mode == "seq-mean-token-sum-norm":
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"mode 'seq-mean-token-sum-norm' needs a positive int max_len, got {max_len!r}")
        return n_seq * max_len
    return n_seq


def aggregate(per_token_loss, mask, mode, normalizer):
    """Scalar loss of one micro-batch: ``numerator / normalizer``.

    ``numerator`` is ``sum_t mask*loss`` for ``token-mean``, ``seq-mean-token-sum``
    and ``seq-mean-token-sum-norm``; for ``seq-mean-token-mean`` it is
    ``sum_seq (sum_t mask*loss / n_tokens_seq)``.  ``normalizer`` is the GLOBAL value
    (sum of :func:`loss_normalizer` over all micro-batches and DP ranks; tensor or
    number).  Padding never contributes, even if it holds NaN/inf.  A normaliser of 0
    (no valid token anywhere) yields 0, not NaN.
    """
    _check_mode(mode)
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be [B, T], got shape {tuple(per_token_loss.shape)}")
    m = as_bool_mask(mask, per_token_loss.shape)
    dtype = compute_dtype(per_token_loss)
    zero = torch.zeros((), dtype=dtype, device=per_token_loss.device)
    masked = torch.where(m, per_token_loss.to(dtype), zero)
    if mode == "seq-mean-token-mean":
        n_tok = m.sum(dim=-1).clamp(min=1).to(dtype)
        numerator = (masked.sum(dim=-1) / n_tok).sum()
    else:
        numerator = masked.sum()
    denom = torch.as_tensor(normalizer, device=per_token_loss.device).to(dtype)
    if denom.dim() != 0:
        raise ValueError(f"normalizer must be a scalar, got shape {tuple(denom.shape)}")
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return numerator / denom
