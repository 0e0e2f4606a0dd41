"""Small shared helpers (private): dtype promotion and mask handling."""
from __future__ import annotations

import torch


def compute_dtype(*tensors) -> torch.dtype:
    """Widest floating dtype of the inputs, at least fp32.

    bf16/fp16 logprob differences and group statistics are too coarse, so all GRPO
    math runs in fp32 (or fp64 when the inputs are fp64, which the tests use).
    """
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_bool_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    """Binary mask (any nonzero = valid) with a shape check."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {tuple(shape)}")
    return mask if mask.dtype == torch.bool else mask != 0
