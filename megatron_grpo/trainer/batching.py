"""From a rollout (token lists) to the training tensors, plus the group filters GRPO users expect.

Row layout matches ``training.GRPOBatch``: ``prompt | completion | right padding`` from position 0;
``completion_mask[b, t] = 1`` on completion tokens that are trained on; per-token tensors are
aligned to the token they score. No process groups here; the loop decides who calls what.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grpo.rollout.types import RolloutBatch


@dataclass
class RolloutTensors:
    input_ids: torch.Tensor  # [B, T] long
    completion_mask: torch.Tensor  # [B, T] float 0/1
    rollout_logprobs: torch.Tensor  # [B, T] float32 (0 outside completions)
    completion_lengths: torch.Tensor  # [B] long
    truncated: torch.Tensor  # [B] bool: finish reason "length"


def rollout_to_tensors(batch: RolloutBatch, *, pad_id: int) -> RolloutTensors:
    rows = len(batch)
    seqs = [list(p) + list(c) for p, c in zip(batch.prompt_token_ids, batch.completion_token_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((rows, width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.float32)
    rollout_lp = torch.zeros((rows, width), dtype=torch.float32)
    lengths = torch.zeros(rows, dtype=torch.long)
    for i, (prompt, completion, lps) in enumerate(
            zip(batch.prompt_token_ids, batch.completion_token_ids, batch.rollout_logprobs)):
        p, c = len(prompt), len(completion)
        if p == 0:
            raise ValueError(f"completion {i} has an empty prompt: nothing predicts its first token")
        input_ids[i, : p + c] = torch.tensor(seqs[i], dtype=torch.long)
        mask[i, p: p + c] = 1.0
        if c:
            rollout_lp[i, p: p + c] = torch.tensor(lps[:c], dtype=torch.float32)
        lengths[i] = c
    truncated = torch.tensor([r == "length" for r in batch.finish_reasons], dtype=torch.bool)
    return RolloutTensors(input_ids, mask, rollout_lp, lengths, truncated)


def informative_groups(rewards: torch.Tensor, group_size: int, *, atol: float = 1e-6) -> list[int]:
    """Indices of groups whose rewards are not all equal (DAPO dynamic sampling keeps these:
    a zero-variance group has zero advantage everywhere and contributes no gradient)."""
    groups = rewards.view(-1, group_size)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    return [int(i) for i in torch.nonzero(spread > atol).flatten()]


def select_groups(batch: RolloutBatch, groups: list[int]) -> RolloutBatch:
    g = batch.group_size
    keep = [i for grp in groups for i in range(grp * g, (grp + 1) * g)]
    data = batch.to_dict()
    out = {k: ([v[i] for i in keep] if isinstance(v, list) and len(v) == len(batch) else v)
           for k, v in data.items()}
    return RolloutBatch(**out)


def loss_mask(tensors: RolloutTensors, *, excluded: list[bool], overlong_filtering: bool) -> torch.Tensor:
    """The completion mask with excluded samples (reward None + on_none=exclude) and, with overlong
    filtering (DAPO), truncated completions zeroed: they are kept for advantages but not trained on."""
    drop = torch.tensor(excluded, dtype=torch.bool)
    if overlong_filtering:
        drop |= tensors.truncated
    return tensors.completion_mask * (~drop).to(tensors.completion_mask.dtype)[:, None]
