"""The tensors of one GRPO training batch, and how they split into DP shards and micro-batches.

Layout (the same as :func:`megatron_grpo.models.logprobs.compute_logprobs`): row ``b`` of
``input_ids`` is ``prompt | completion | right padding`` starting at position 0. Every per-token
tensor is ``[B, T]`` aligned to TOKEN positions: ``completion_mask[b, t] = 1`` marks the completion
tokens that are trained on, and ``old_logprobs[b, t]`` etc. are the logprobs OF token ``t`` (as
returned by ``compute_logprobs`` and by vLLM per generated token). Position 0 is never a target.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["GRPOBatch"]

_PER_TOKEN = ("completion_mask", "old_logprobs", "ref_logprobs", "rollout_logprobs")


@dataclass
class GRPOBatch:
    input_ids: torch.Tensor  # [B, T] int
    completion_mask: torch.Tensor  # [B, T] 0/1 (or bool)
    advantages: torch.Tensor  # [B] per sequence, or [B, T] per token
    old_logprobs: torch.Tensor | None = None  # [B, T]; None = on-policy (ratio 1)
    ref_logprobs: torch.Tensor | None = None  # [B, T]; needed when kl_coef > 0
    rollout_logprobs: torch.Tensor | None = None  # [B, T]; for truncated IS / mismatch metrics
    routing: torch.Tensor | None = None  # [B, T, L, k] MoE experts of the old pass (models/routing_replay.py)

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(self.input_ids.shape)}")
        shape = tuple(self.input_ids.shape)
        for name in _PER_TOKEN:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must be [B, T] = {shape}, got {tuple(t.shape)}")
        if tuple(self.advantages.shape) not in (shape[:1], shape):
            raise ValueError(f"advantages must be [B] or [B, T], got {tuple(self.advantages.shape)}")
        if bool(self.completion_mask[:, 0].any()):
            raise ValueError("completion_mask[:, 0] must be 0: nothing predicts the first token")

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    def _map(self, fn) -> "GRPOBatch":
        return GRPOBatch(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                            for f in dataclasses.fields(self)})

    def select(self, rows) -> "GRPOBatch":
        """Rows ``rows`` (slice or index tensor) of every field."""
        return self._map(lambda t: t[rows])

    def to(self, device) -> "GRPOBatch":
        return self._map(lambda t: t.to(device))

    def pad_rows(self, n: int) -> "GRPOBatch":
        """Append ``n`` empty rows (mask 0): they add nothing to any loss, normaliser or metric."""
        if n <= 0:
            return self
        return self._map(lambda t: torch.cat([t, t.new_zeros((n, *t.shape[1:]))]))

    def pad_columns(self, multiple: int) -> "GRPOBatch":
        """Right-pad the sequence dim to a multiple of ``multiple`` (sequence parallelism needs a multiple
        of TP): padded tokens have mask 0, so they add nothing to any loss, normaliser or metric."""
        from megatron_grpo.models.norms import pad_sequence

        if multiple <= 1 or self.seq_length % multiple == 0:
            return self

        def pad(name, t):
            per_sequence = name == "advantages" and t.dim() == 1
            return t if t is None or per_sequence else pad_sequence(t, multiple, 0)

        return GRPOBatch(**{f.name: pad(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)})

    def micro_batches(self, micro_batch_size: int) -> list["GRPOBatch"]:
        """Consecutive micro-batches of ``micro_batch_size`` rows; the last one padded with empty rows."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        n = -(-self.batch_size // micro_batch_size)
        padded = self.pad_rows(n * micro_batch_size - self.batch_size)
        return [padded.select(slice(i * micro_batch_size, (i + 1) * micro_batch_size)) for i in range(n)]

    def shard_for_dp(self, dp_rank: int, dp_size: int) -> "GRPOBatch":
        """This DP rank's contiguous share of a global batch (sizes differ by at most one row)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        base, extra = divmod(self.batch_size, dp_size)
        start = dp_rank * base + min(dp_rank, extra)
        return self.select(slice(start, start + base + (1 if dp_rank < extra else 0)))
