"""Format-shaping rewards from Open R1: the think/answer layout, tag counts, reasoning steps."""
from __future__ import annotations

import re
from typing import Any, Sequence

from megatron_grpo.rewards.text import completion_text

# The seed recipe's regex, matched without flags: "." does not cross newlines, so the whole
# completion must be one line, exactly as the seed's SYSTEM_PROMPT example writes it.
SEED_FORMAT_PATTERN = re.compile(r"^<think>.*?</think><answer>.*?</answer>$")
# Newer open-r1: each tag on its own line; DOTALL | MULTILINE exactly as open-r1 compiles it.
OPEN_R1_FORMAT_PATTERN = re.compile(
    r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE
)
FORMAT_VARIANTS = {"seed": SEED_FORMAT_PATTERN, "open_r1": OPEN_R1_FORMAT_PATTERN}

# open-r1's tag_count looks for the newline-delimited forms of the four tags.
OPEN_R1_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
BARE_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# open-r1's reasoning_steps pattern (no MULTILINE: "^\d+\." only matches at the very start).
REASONING_STEP_PATTERN = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")


def make_format_reward(*, variant: str = "seed"):
    """Factory for ``format``: 1.0 if the completion has the think/answer layout, else 0.0.

    variant: "seed" (``^<think>.*?</think><answer>.*?</answer>$``, no flags) or "open_r1"
    (``^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$`` with DOTALL | MULTILINE).
    """
    if variant not in FORMAT_VARIANTS:
        raise ValueError(f"format variant must be one of {sorted(FORMAT_VARIANTS)}, got {variant!r}")
    pattern = FORMAT_VARIANTS[variant]

    def format_reward(completions: Sequence[Any], *, solutions=None, **kwargs: Any) -> list[float | None]:
        """1.0 where the layout regex matches from the start of the completion."""
        return [1.0 if pattern.match(completion_text(c)) else 0.0 for c in completions]

    return format_reward


def make_tag_count_reward(*, newline_tags: bool = True):
    """Factory for ``tag_count``: 0.25 for each of the four tags that occurs exactly once.

    newline_tags=True is open-r1's definition (counts ``"<think>\\n"``, ``"\\n</think>\\n"``,
    ``"\\n<answer>\\n"``, ``"\\n</answer>"``); False counts the bare tags (the seed's one-line layout).
    """
    tags = OPEN_R1_TAGS if newline_tags else BARE_TAGS

    def tag_count_reward(completions: Sequence[Any], *, solutions=None, **kwargs: Any) -> list[float | None]:
        """Partial credit towards the format reward, so the policy can climb to it."""
        rewards = []
        for completion in completions:
            text = completion_text(completion)
            rewards.append(sum(0.25 for tag in tags if text.count(tag) == 1))
        return rewards

    return tag_count_reward


def make_reasoning_steps_reward(*, target_steps: int = 3):
    """Factory for ``reasoning_steps``: min(1, n / target_steps), n = step markers found (open-r1: 3).

    Markers: "Step N:", "N." at the very start, "\\n-", "\\n*", "First,", "Second,", "Next,", "Finally,".
    """
    if target_steps <= 0:
        raise ValueError(f"target_steps must be positive, got {target_steps}")

    def reasoning_steps_reward(completions: Sequence[Any], *, solutions=None, **kwargs: Any) -> list[float | None]:
        """Rewards visible step-by-step structure."""
        counts = [len(REASONING_STEP_PATTERN.findall(completion_text(c))) for c in completions]
        return [min(1.0, n / target_steps) for n in counts]

    return reasoning_steps_reward
