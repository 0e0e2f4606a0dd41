"""Which forward passes a GRPO step needs, and how its rows are shared over data-parallel ranks.

* Old-policy logprobs: with one update pass over one mini-batch (``update_epochs == 1``,
  ``mini_batches == 1``) the policy that generated the batch IS the policy being trained, so the
  old logprobs are the training forward's own, detached (``grpo_loss(old_logprobs=None)``): the
  separate forward pass over the batch is skipped (TRL does the same when ``num_iterations=1``).
  The values are the same (same weights, same micro-batches), so the loss, gradients, IS weights
  and mismatch metrics are too. Only ``kl_in_reward`` needs them before training (for the
  advantages) and keeps the separate pass.
* DP shards: contiguous rows by default; with token-budget micro-batches
  (``algorithm.max_tokens_per_microbatch``) rows are balanced by tokens (``training/token_budget``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["on_policy", "old_policy_logprobs", "routing_record", "dp_shard_rows", "gather_rows"]


def on_policy(cfg) -> bool:
    """True when the training forward's logprobs can serve as the old-policy logprobs."""
    a = cfg.algorithm
    if a.get("recompute_old_logprobs", False) or (cfg.get("rollout") or {}).get("async_steps", 0):  # off-policy batch
        return False
    return a.update_epochs == 1 and a.mini_batches == 1 and not (a.kl_in_reward and a.kl_coef > 0)


def old_policy_logprobs(cfg, chunks, ids, mask, routing_record=None, **lp_kwargs):
    """The old-policy logprobs ``[B, T]``, or None when on-policy (the training forward gives them).
    ``routing_record`` (MoE): filled with every row's experts per MoE layer of this stage (R2)."""
    from megatron_grpo.models.logprobs import compute_logprobs

    if on_policy(cfg):
        return None
    if routing_record is not None:
        from megatron_grpo.models.routing_replay import RoutingPass

        mode = "replay" if cfg.algorithm.get("routing_replay") == "r3" else "record"  # R3: the rollout's experts
        lp_kwargs["routing"] = RoutingPass(chunks, mode, routing_record)
    return compute_logprobs(chunks, ids, mask, **lp_kwargs)


def routing_record(cfg, info, ids, rollout_experts=None, chunks=None):
    """An empty per-row routing record for an MoE policy with an old-logprob pass, else None; with
    ``algorithm.routing_replay=r3`` the rollout engine's experts of these rows (``rollout_experts``:
    ``RolloutBatch.routed_experts`` of this shard), replayed by every pass, on-policy too.

    Recorded whenever there is an old pass (the training step compares its routing with it:
    ``train/moe/routing_changed_frac``); replayed by the reference and training passes only with
    ``algorithm.routing_replay=r2``. On-policy (one update pass) there is no old pass: the training
    forward IS the first pass at these weights, its routing is the old routing, and R2 has nothing to
    replay; R2 matters with ``update_epochs > 1`` or ``mini_batches > 1`` (or ``recompute_old_logprobs``)."""
    from megatron_grpo.models.routing_replay import RoutingRecord, from_rollout

    if info.num_experts and cfg.algorithm.get("routing_replay") == "r3":
        if not rollout_experts:
            raise RuntimeError("algorithm.routing_replay=r3: the rollout batch carries no routed experts")
        return from_rollout(chunks, rollout_experts, int(ids.shape[1]))
    if not info.num_experts or on_policy(cfg):
        return None
    return RoutingRecord(int(ids.shape[0]), int(ids.shape[1]))


def dp_shard_rows(n: int, layout, mask=None, max_tokens=None):
    """This DP rank's rows of the global batch: a slice (contiguous, sizes differ by at most one) or,
    with a token budget, an index tensor of rows balanced by tokens."""
    if max_tokens and mask is not None and layout.dp > 1:
        from megatron_grpo.training.token_budget import balance_dp, row_lengths

        return torch.tensor(balance_dp(row_lengths(mask), layout.dp)[layout.dp_rank], dtype=torch.long)
    base, extra = divmod(n, layout.dp)
    lo = layout.dp_rank * base + min(layout.dp_rank, extra)
    return slice(lo, lo + base + (1 if layout.dp_rank < extra else 0))


def gather_rows(local: torch.Tensor, rows, n: int, layout) -> torch.Tensor:
    """Every DP rank's rows ``local`` (its ``rows`` of the global batch) back in global order, on every rank."""
    from megatron.core import parallel_state as ps

    idx = torch.arange(n)[rows] if isinstance(rows, slice) else rows
    parts = [None] * layout.dp
    dist.all_gather_object(parts, (local.cpu(), idx.cpu()), group=ps.get_data_parallel_group())
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for part, i in parts:
        out[i] = part
    return out
