"""Completion text access shared by the reward functions."""
from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion.

    Rewards take plain strings; TRL/open-r1 conversational completions (a list of message dicts,
    or one message dict) are accepted too, so reward code ported from them keeps working.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or chat messages, got {type(completion).__name__}")
