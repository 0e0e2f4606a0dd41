"""Prompt data for GRPO: dataset loading and validation (HF datasets), chat-template prompt
building with the seed's SYSTEM_PROMPT, a resumable data-parallel sampler, and a synthetic
arithmetic dataset for the CPU demo."""
from megatron_grpo.data.loading import DatasetLoadError, PromptSplits, load_prompt_dataset
from megatron_grpo.data.prompts import SYSTEM_PROMPT, build_messages, render_prompt, tokenize_prompts
from megatron_grpo.data.sampler import ResumablePromptSampler

_SYNTHETIC = ("make_synthetic_splits", "write_synthetic_dataset")


def __getattr__(name):
    """Synthetic-data helpers load lazily, so ``python -m megatron_grpo.data.synthetic`` runs cleanly."""
    if name in _SYNTHETIC:
        from megatron_grpo.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'megatron_grpo.data' has no attribute {name!r}")


__all__ = [
    "DatasetLoadError",
    "PromptSplits",
    "ResumablePromptSampler",
    "SYSTEM_PROMPT",
    "build_messages",
    "load_prompt_dataset",
    "make_synthetic_splits",
    "render_prompt",
    "tokenize_prompts",
    "write_synthetic_dataset",
]
