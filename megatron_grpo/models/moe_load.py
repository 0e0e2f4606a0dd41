"""Per-layer MoE expert load of a training pass: how many tokens each expert received.

Why: a collapsing router (every token on one or two experts) is invisible in the loss until it hurts;
the load-balancing aux loss is a proxy, the load itself is the fact. Computed from the routing maps
the training pass already observes (``routing_replay.observing``: the routing actually USED, replayed
or not), so it costs one ``[tokens, E]`` sum per layer and micro-batch, plus one all-reduce per update.

Metrics (``train/moe/...`` in the log), over this rank's MoE layers and all DP ranks' tokens:

* ``load_max_share``: the largest share of a layer's routed (token, expert) slots that one expert
  received, worst (largest) over layers; 1/E is perfectly balanced, 1 is collapsed (top-1);
* ``load_min_share``: the smallest expert share, worst (smallest) over layers;
* ``load_entropy``: the entropy of each layer's expert shares divided by log(E) (1 = uniform), mean over
  layers.

Padding positions (after a row's last completion token) are excluded.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["expert_load_counts", "load_stats", "reduced_load_metrics"]


def expert_load_counts(maps, b: int, lengths, *, lo: int = 0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, E]`` float64 tokens per expert of one micro-batch: ``maps`` are the routers' ``[s * b, E]``
    routing maps (token order ``[s, b]``, megatron's), ``lengths[i]`` the tokens row ``i`` needs; ``lo``:
    the position of this rank's first token (sequence parallelism); ``keep`` ``[b, s]``: only these
    positions (a replay leaves unrecorded ones, e.g. R3's last token, on placeholder experts)."""
    used = torch.stack([m.reshape(-1, b, m.shape[-1]) for m in maps])  # [L, s, b, E]
    pos = lo + torch.arange(used.shape[1], device=used.device)
    valid = pos[:, None] < torch.as_tensor(lengths, device=used.device)[None, :]  # [s, b]
    if keep is not None:
        valid = valid & keep.to(valid.device).transpose(0, 1)
    return (used.to(torch.float64) * valid[None, :, :, None]).sum(dim=(1, 2)).cpu()


def load_stats(counts: torch.Tensor) -> tuple[float, float, float]:
    """(max share, min share, normalised entropy) per layer of ``[L, E]`` counts, aggregated over layers
    as (max, min, sum); layers without tokens are skipped. Returns sums for the caller to combine."""
    tot = counts.sum(-1, keepdim=True)
    keep = tot.squeeze(-1) > 0
    if not bool(keep.any()):
        return float("-inf"), float("inf"), 0.0
    p = counts[keep] / tot[keep]
    e = counts.shape[-1]
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1) / (math.log(e) if e > 1 else 1.0)
    return float(p.max(-1).values.max()), float(p.min(-1).values.min()), float(ent.sum())


def reduced_load_metrics(counts: torch.Tensor | None, device, *, sequence_parallel: bool = False) -> dict:
    """``moe/load_*`` of this step from this rank's ``[L, E]`` counts: summed over TP (sequence
    parallelism: each TP rank routed its chunk) and DP (expert parallelism is carved out of it), then
    combined over pipeline stages (each holds its own layers). Every rank calls it (collectives)."""
    from megatron.core import parallel_state as ps

    if counts is None:
        return {}
    c = counts.to(device=device, dtype=torch.float64)
    if c.numel():  # a stage without MoE layers has none (its TP/DP peers neither)
        if sequence_parallel:
            dist.all_reduce(c, group=ps.get_tensor_model_parallel_group())
        dist.all_reduce(c, group=ps.get_data_parallel_group())
    mx, mn, ent = load_stats(c.cpu())
    layers = int((c.sum(-1) > 0).sum())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        g = ps.get_pipeline_model_parallel_group()
        t = torch.tensor([mx, -mn], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
        s = torch.tensor([ent, layers], dtype=torch.float64, device=device)
        dist.all_reduce(s, group=g)
        mx, mn, ent, layers = float(t[0]), -float(t[1]), float(s[0]), int(s[1])
    if layers == 0:
        return {}
    return {"moe/load_max_share": mx, "moe/load_min_share": mn, "moe/load_entropy": ent / layers}
