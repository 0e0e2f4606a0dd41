"""Prompt building: ``[system(SYSTEM_PROMPT), user(problem)]`` rendered with the tokenizer's chat
template (generation prompt appended) and tokenized, as the Open R1 seed recipe does.

The rendered text is tokenized with ``add_special_tokens=False``: the chat template already writes
any BOS/special tokens, and adding them again would double a Llama-style BOS (TRL does the same).
Prompts longer than ``max_prompt_length`` tokens are dropped and counted (the seed/TRL truncates
from the left instead, which silently cuts the problem text).
"""
from __future__ import annotations

from typing import Any

from megatron_grpo.prompts import SYSTEM_PROMPT

__all__ = ["SYSTEM_PROMPT", "build_messages", "render_prompt", "tokenize_prompts"]


def build_messages(problem: str, *, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages for one problem; system_prompt None or "" leaves the system turn out."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem})
    return messages


def render_prompt(problem: str, tokenizer: Any, *, system_prompt: str | None = SYSTEM_PROMPT) -> str:
    """The prompt text the policy sees: the chat template with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; prompts are rendered with apply_chat_template")
    return tokenizer.apply_chat_template(
        build_messages(problem, system_prompt=system_prompt), tokenize=False, add_generation_prompt=True
    )


def tokenize_prompts(
    dataset: Any,
    tokenizer: Any,
    *,
    system_prompt: str | None = SYSTEM_PROMPT,
    max_prompt_length: int | None = None,
    split_name: str = "train",
) -> tuple[Any, dict[str, int]]:
    """Add ``prompt_text`` and ``prompt_ids`` columns; drop prompts over max_prompt_length tokens.

    Returns (dataset, stats) with stats ``prompts`` (kept) and ``dropped_too_long``. Raises a
    ValueError with the counts when nothing is left.
    """
    texts = [render_prompt(p, tokenizer, system_prompt=system_prompt) for p in dataset["problem"]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    keep = [i for i, seq in enumerate(ids) if max_prompt_length is None or len(seq) <= max_prompt_length]
    dropped = len(ids) - len(keep)
    if not keep:
        raise ValueError(
            f"no {split_name} prompts left: {len(ids)} rows, {dropped} longer than "
            f"max_prompt_length={max_prompt_length} tokens"
        )
    for name in ("prompt_text", "prompt_ids"):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    dataset = dataset.add_column("prompt_text", texts).add_column("prompt_ids", [list(x) for x in ids])
    if dropped:
        dataset = dataset.select(keep)
    return dataset, {"prompts": len(keep), "dropped_too_long": dropped}
