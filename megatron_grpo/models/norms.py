"""Sequence parallelism with megatron-core's local (non-TransformerEngine) layer spec.

Why: the local spec builds its RMSNorms with ``WrappedTorchNorm``, which asserts
``not config.sequence_parallel``, so TP>1 runs without TransformerEngine could not use sequence
parallelism. Under SP each TP rank normalises a different slice of the sequence, so the replicated
norm weights get partial gradients that must be summed over TP; megatron-core does that in
``finalize_model_grads`` for every parameter marked ``sequence_parallel = True`` (what its own
``FusedLayerNorm`` and TE's norms do). :class:`SequenceParallelRMSNorm` is torch's RMSNorm (same
kernel, same numbers as ``WrappedTorchNorm``) with that mark, and :func:`sequence_parallel_spec`
puts it into a local spec: the layers' norms and the block's final norm. The TE spec keeps TE's norms.

SP also scatters the sequence over TP ranks, so the sequence length must be a multiple of TP:
:func:`sequence_multiple` / :func:`pad_sequence` (callers pad on the right, mask the padding out
and drop it from their outputs; right padding never reaches real tokens under the causal mask).
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["SequenceParallelRMSNorm", "sequence_parallel_spec", "sequence_multiple", "pad_sequence"]


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built like megatron-core's norms; its weight carries ``sequence_parallel``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(f"SequenceParallelRMSNorm is an RMSNorm without zero-centred gamma, "
                             f"not normalization={config.normalization!r}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # finalize_model_grads all-reduces over TP the grads of parameters with this mark
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def _swap_norms(spec, old, new):
    """A copy of a (nested) ModuleSpec / submodules dataclass with every ``old`` module class -> ``new``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_swap_norms(spec.module, old, new),
                                   submodules=_swap_norms(spec.submodules, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _swap_norms(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    if isinstance(spec, (list, tuple)):
        return type(spec)(_swap_norms(s, old, new) for s in spec)
    return spec


def sequence_parallel_spec(layer_spec, config, *, vp_stage: int | None = None):
    """The block spec for a local layer spec under SP: torch-RMSNorm norms (layers and final norm)
    replaced by :class:`SequenceParallelRMSNorm`. ``layer_spec``: a transformer-layer ModuleSpec or
    a ``TransformerBlockSubmodules``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    norm = SequenceParallelRMSNorm
    if isinstance(layer_spec, TransformerBlockSubmodules):
        block = layer_spec
    else:
        block = TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                           layer_norm=WrappedTorchNorm)
    return _swap_norms(block, WrappedTorchNorm, norm)


def sequence_multiple(model_or_config) -> int:
    """The multiple the sequence length of a forward pass must have: TP under SP, else 1."""
    config = getattr(model_or_config, "config", None) or model_or_config
    if not hasattr(config, "sequence_parallel"):
        from megatron.core.utils import get_model_config

        config = get_model_config(model_or_config)
    return int(config.tensor_model_parallel_size) if config.sequence_parallel else 1


def pad_sequence(t: torch.Tensor, multiple: int, value=0) -> torch.Tensor:
    """``t`` ``[B, T, ...]`` right-padded along dim 1 with ``value`` to a multiple of ``multiple``."""
    extra = -t.shape[1] % multiple
    if extra == 0:
        return t
    return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), value)], dim=1)
