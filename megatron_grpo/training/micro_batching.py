"""How the training step and the logprob passes cut a batch into micro-batches, and put rows back.

Two ways: fixed ``micro_batch_size`` rows padded to the batch's length (the default), or
token-budget micro-batches (``algorithm.max_tokens_per_microbatch``, planned in
:mod:`.token_budget`) of varying rows and lengths. Megatron's pipeline schedule sends activations
of one fixed shape between stages unless ``config.variable_seq_lengths`` is set (then each send is
preceded by its shape): :func:`variable_shapes` sets it for the token-budget passes only.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .token_budget import row_lengths, split_batch

__all__ = ["split_micro_batches", "assemble_rows", "padding_fraction", "variable_shapes", "length_multiple",
           "budget_logprob_batches"]


def length_multiple(config) -> int:
    """Sequence parallelism splits the sequence over TP ranks: lengths must be a multiple of TP."""
    if config is not None and getattr(config, "sequence_parallel", False):
        return int(getattr(config, "tensor_model_parallel_size", 1) or 1)
    return 1


def split_micro_batches(batch, micro_batch_size: int, max_tokens: int | None, config=None):
    """``(micro_batches, row_groups or None, (real_tokens, padded_tokens))`` of a ``GRPOBatch``."""
    if max_tokens:
        return split_batch(batch, max_tokens, multiple_of=length_multiple(config))
    mbs = batch.micro_batches(micro_batch_size)
    return mbs, None, (sum(row_lengths(batch.completion_mask)), len(mbs) * micro_batch_size * batch.seq_length)


def assemble_rows(parts, groups, batch_size: int, seq_length: int):
    """Per-micro-batch outputs ``[..., rows, t]`` back into ``[..., batch_size, seq_length]`` rows in
    batch order (zeros beyond each micro-batch's length); None when there are none (not the last
    pipeline stage)."""
    parts = list(parts)
    if not parts:
        return None
    if groups is None:
        return torch.cat(parts, dim=-2)[..., :batch_size, :].contiguous()
    p0 = parts[0]
    out = p0.new_zeros((*p0.shape[:-2], batch_size, seq_length))
    for g, p in zip(groups, parts):
        out[..., torch.tensor(g, dtype=torch.long, device=p.device), : p.shape[-1]] = p
    return out


def padding_fraction(tokens, device) -> float:
    """1 - real / processed tokens of the forward passes, summed over the DP group."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(tokens[0]), float(tokens[1])], dtype=torch.float64, device=device)
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ps.get_data_parallel_group())
    return float(1.0 - t[0] / t[1]) if t[1] > 0 else 0.0


@contextlib.contextmanager
def variable_shapes(config, enabled: bool):
    """Let Megatron's pipeline schedule send micro-batches of different shapes (PP > 1 only)."""
    from megatron.core import parallel_state as ps

    if not enabled or ps.get_pipeline_model_parallel_world_size() == 1 or not hasattr(config, "variable_seq_lengths"):
        yield
        return
    before = config.variable_seq_lengths
    config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = before


def budget_logprob_batches(ids, mask, max_tokens: int, model_chunk):
    """``compute_logprobs``'s micro-batch dicts under a token budget, and their row groups."""
    from megatron.core.utils import get_model_config

    from .token_budget import plan_micro_batches

    lengths = row_lengths(mask)
    groups = plan_micro_batches(lengths, max_tokens)
    mult = length_multiple(get_model_config(model_chunk))
    batches = []
    for g in groups:
        t = min(ids.shape[1], -(-max(lengths[i] for i in g) // mult) * mult)
        rows = torch.tensor(g, dtype=torch.long, device=ids.device)
        batches.append({"input_ids": ids[rows, :t], "mask": mask[rows, :t], "attention_mask": None,
                        "position_ids": torch.arange(t, device=ids.device)[None].expand(len(g), t)})
    return batches, groups
