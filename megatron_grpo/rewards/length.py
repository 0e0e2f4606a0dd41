"""Length and repetition shaping from open-r1: Kimi 1.5 length, cosine-scaled length, n-gram
repetition penalty, and DAPO's soft overlong punishment.

Lengths are characters of the completion text (as open-r1 measures them) unless a reward says it
uses token lengths; token lengths come from the ``completion_lengths`` (list[int]) or
``completion_ids`` (list[list[int]]) keyword, whichever the caller passes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from megatron_grpo.rewards.math_accuracy import is_correct
from megatron_grpo.rewards.staged import StagedReward
from megatron_grpo.rewards.text import completion_text


def token_lengths(n: int, kwargs: dict) -> list[int]:
    """Per-sample completion token counts from ``completion_lengths`` or ``completion_ids``."""
    if kwargs.get("completion_lengths") is not None:
        lengths = [int(x) for x in kwargs["completion_lengths"]]
    elif kwargs.get("completion_ids") is not None:
        lengths = [len(ids) for ids in kwargs["completion_ids"]]
    else:
        raise ValueError("this reward needs token lengths: pass completion_lengths= or completion_ids=")
    if len(lengths) != n:
        raise ValueError(f"{n} completions but {len(lengths)} token lengths")
    return lengths


def _correctness(completions, solutions, parsing_timeout, verify_timeout) -> list[bool | None]:
    if solutions is None:
        raise ValueError("this reward needs solutions to judge correctness")
    if len(solutions) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(solutions)} solutions")
    return [
        is_correct(completion_text(c), s, parsing_timeout=parsing_timeout, verify_timeout=verify_timeout)
        for c, s in zip(completions, solutions)
    ]


class KimiLengthReward(StagedReward):
    """Kimi 1.5 length reward (open-r1 ``len_reward``): lam = 0.5 - (len - min) / (max - min);
    correct answers get lam, wrong ones min(0, lam); all zeros when every length is equal.

    min/max are taken over the whole call (open-r1), or within each group when the caller passes
    ``group_ids`` (Kimi's definition: the k samples of one prompt).
    unparseable_gold: "correct" (open-r1: do not penalise), "wrong", or "skip" (None).
    """

    def __init__(self, *, unparseable_gold: str = "correct", use_token_lengths: bool = False,
                 parsing_timeout: int | None = 5, verify_timeout: int | None = 5):
        if unparseable_gold not in ("correct", "wrong", "skip"):
            raise ValueError(f"unparseable_gold must be 'correct', 'wrong' or 'skip', got {unparseable_gold!r}")
        self.unparseable_gold = unparseable_gold
        self.use_token_lengths = use_token_lengths
        self.parsing_timeout = parsing_timeout
        self.verify_timeout = verify_timeout

    def per_sample(self, completions, *, solutions=None, **kwargs) -> list[bool | None]:
        return _correctness(completions, solutions, self.parsing_timeout, self.verify_timeout)

    def combine(self, per_sample_values, completions, *, solutions=None, **kwargs) -> list[float | None]:
        n = len(completions)
        if self.use_token_lengths:
            lengths = token_lengths(n, kwargs)
        else:
            lengths = [len(completion_text(c)) for c in completions]
        group_ids = kwargs.get("group_ids")
        groups = list(group_ids) if group_ids is not None else [0] * n
        if len(groups) != n:
            raise ValueError(f"{n} completions but {len(groups)} group_ids")
        bounds: dict[Any, tuple[int, int]] = {}
        for g, length in zip(groups, lengths):
            lo, hi = bounds.get(g, (length, length))
            bounds[g] = (min(lo, length), max(hi, length))
        rewards: list[float | None] = []
        for correct, length, g in zip(per_sample_values, lengths, groups):
            lo, hi = bounds[g]
            if correct is None:
                if self.unparseable_gold == "skip":
                    rewards.append(None)
                    continue
                correct = self.unparseable_gold == "correct"
            if hi == lo:
                rewards.append(0.0)
                continue
            lam = 0.5 - (length - lo) / (hi - lo)
            rewards.append(float(lam if correct else min(0.0, lam)))
        return rewards


def make_len_reward(**params: Any) -> KimiLengthReward:
    """Factory for ``length`` (see :class:`KimiLengthReward` for the parameters)."""
    return KimiLengthReward(**params)


def make_cosine_reward(
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    clamp: bool = True,
    unparseable_gold: str | float = 1.0,
    parsing_timeout: int | None = 5,
    verify_timeout: int | None = 5,
):
    """Factory for ``cosine`` (open-r1 ``get_cosine_scaled_reward``, same defaults).

    r = lo + 0.5 * (hi - lo) * (1 + cos(pi * len / max_len)); correct: lo, hi = min/max_value_correct
    (shorter is better); wrong: lo, hi = max_value_wrong, min_value_wrong (longer is penalised less).
    len is in characters. clamp=True caps len at max_len; open-r1 does not (clamp=False), so past
    max_len its cosine wraps around and very long answers climb back up.
    unparseable_gold: open-r1 gives 1.0; "skip" returns None.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if unparseable_gold != "skip" and not isinstance(unparseable_gold, (int, float)):
        raise ValueError(f"unparseable_gold must be 'skip' or a number, got {unparseable_gold!r}")

    def cosine_reward(completions: Sequence[Any], *, solutions=None, **kwargs: Any) -> list[float | None]:
        """Length-scaled correctness: short right answers best, short wrong answers worst."""
        correctness = _correctness(completions, solutions, parsing_timeout, verify_timeout)
        rewards: list[float | None] = []
        for completion, correct in zip(completions, correctness):
            if correct is None:
                rewards.append(None if unparseable_gold == "skip" else float(unparseable_gold))
                continue
            length = len(completion_text(completion))
            if clamp:
                length = min(length, max_len)
            cosine = math.cos(length / max_len * math.pi)
            lo, hi = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
            rewards.append(float(lo + 0.5 * (hi - lo) * (1.0 + cosine)))
        return rewards

    return cosine_reward


def make_repetition_penalty_reward(*, ngram_size: int = 3, max_penalty: float = -1.0):
    """Factory for ``repetition_penalty`` (open-r1 ``get_repetition_penalty_reward``, English splitting).

    r = (1 - distinct n-grams / total n-grams) * max_penalty over lower-cased whitespace words;
    0.0 for an empty completion or one with fewer than ngram_size words.
    """
    if max_penalty > 0:
        raise ValueError(f"max_penalty {max_penalty} should not be positive")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")

    def repetition_penalty_reward(completions: Sequence[Any], *, solutions=None, **kwargs: Any) -> list[float | None]:
        """Penalises repeated n-grams (Appendix C.2 of arXiv:2502.03373)."""
        rewards: list[float | None] = []
        for completion in completions:
            words = completion_text(completion).lower().split()
            if len(words) < ngram_size:
                rewards.append(0.0)
                continue
            ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
            rewards.append((1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty)
        return rewards

    return repetition_penalty_reward


def make_soft_overlong_reward(*, max_completion_len: int, soft_punish_cache: int):
    """Factory for ``soft_overlong`` (DAPO Eq. 13, open-r1/TRL ``get_soft_overlong_punishment``).

    Token length L: 0 if L <= max - cache; (max - cache - L) / cache if max - cache < L <= max;
    -1 beyond max. Needs ``completion_lengths`` or ``completion_ids``.
    """
    if not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(
            f"need 0 <= soft_punish_cache <= max_completion_len, got {soft_punish_cache} and {max_completion_len}"
        )
    start = max_completion_len - soft_punish_cache

    def soft_overlong_reward(completions: Sequence[Any], *, solutions=None, **kwargs: Any) -> list[float | None]:
        """Punishes only completions near or past the length limit; never rewards short ones."""
        rewards: list[float | None] = []
        for length in token_lengths(len(completions), kwargs):
            if length <= start:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((start - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_reward
