"""Token-budget micro-batches (veRL's dynamic batch size, NeMo-RL's dynamic batching).

Fixed micro-batches of ``micro_batch_size`` rows pad every row to the longest row of the whole
batch; with long-tailed reasoning traces most of those tokens are padding. Here rows are grouped
under a budget of ``max_tokens`` PADDED tokens per micro-batch (``rows x longest row``), longest
first, and each micro-batch is cut to its own longest row. The loss stays exact because the
training step normalises with the global normaliser (``training/step.py``), whatever the grouping.

The planning is pure functions over row lengths (ints), so it is the same on every rank of a
model-parallel group (they hold the same rows) and testable without a model.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

__all__ = ["row_lengths", "plan_micro_batches", "balance_dp", "padded_tokens", "split_batch"]


def row_lengths(mask: torch.Tensor) -> list[int]:
    """Tokens each row needs: up to and including its last masked position (>= 1). The causal model
    never lets later positions influence earlier ones, so the rest of the row can be cut off."""
    m = mask != 0
    t = m.shape[1]
    if m.shape[0] == 0:
        return []
    pos = torch.arange(1, t + 1, device=m.device).expand_as(m)
    return [max(1, x) for x in torch.where(m, pos, torch.zeros_like(pos)).max(dim=1).values.tolist()]


def _greedy(order: list[int], lengths: Sequence[int], cap: int) -> list[list[int]]:
    """Consecutive groups of ``order`` (longest first) with rows x longest <= cap (a longer row alone)."""
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= cap:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices per micro-batch: sorted longest-first, cut greedily under ``max_tokens`` padded
    tokens (the fewest micro-batches this order allows), then balanced: the same number of
    micro-batches with the smallest largest one (binary search on the cap), so that pipeline stages
    and ranks wait less on one big micro-batch. A row longer than the budget gets its own."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    k = len(_greedy(order, lengths, max_tokens))
    lo, hi = 1, max_tokens
    while lo < hi:  # smallest cap that still needs no more than k micro-batches
        mid = (lo + hi) // 2
        if len(_greedy(order, lengths, mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    return _greedy(order, lengths, lo)


def balance_dp(lengths: Sequence[int], dp: int) -> list[list[int]]:
    """Rows per DP rank balanced by tokens, not rows: longest first onto the rank with the fewest
    tokens so far (LPT). Every rank gets a row when there are at least ``dp``; each rank's rows
    keep their original order."""
    if dp <= 0:
        raise ValueError(f"dp must be positive, got {dp}")
    load, parts = [0] * dp, [[] for _ in range(dp)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(dp), key=lambda r: (load[r], len(parts[r]), r))
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]


def padded_tokens(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> int:
    """Tokens the forward passes process for this grouping (each group padded to its longest row)."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups if g)


def split_batch(batch, max_tokens: int, *, multiple_of: int = 1):
    """A ``GRPOBatch`` as token-budget micro-batches: ``(micro_batches, row_groups, stats)``.

    Each micro-batch holds the rows of one group, cut to their longest row (rounded up to
    ``multiple_of`` for sequence parallelism, never past the batch's length). ``stats`` =
    ``(real_tokens, padded_tokens)`` of this grouping.
    """
    lengths = row_lengths(batch.completion_mask)
    groups = plan_micro_batches(lengths, max_tokens)
    t_full = batch.seq_length
    out = []
    for g in groups:
        t = max(lengths[i] for i in g)
        t = min(t_full, -(-t // multiple_of) * multiple_of)
        sel = batch.select(torch.tensor(g, dtype=torch.long))
        out.append(dataclasses.replace(sel, **{
            f.name: getattr(sel, f.name)[:, :t] for f in dataclasses.fields(sel)
            if getattr(sel, f.name) is not None and getattr(sel, f.name).dim() >= 2}))  # [B, T, ...]
    real = sum(lengths)
    padded = sum(x.batch_size * x.seq_length for x in out)
    return out, groups, (real, padded)
