"""Math answer correctness with math-verify, using the Open R1 seed recipe's exact extraction.

Gold: ``parse(solution, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])``.
Answer: LaTeX only, ``\\boxed{}`` tried first, no anchor-less extraction, no malformed-operator repair
(the model must write correct LaTeX). ``verify(gold, answer)`` -- gold first: verify is asymmetric.

math-verify times itself out with ``signal.alarm``, which only works on a process's main thread;
:class:`~megatron_grpo.rewards.manager.RewardManager` runs these functions in worker processes
(main thread) and adds a hard timeout from outside.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from megatron_grpo.rewards.text import completion_text

UNPARSEABLE_GOLD_POLICIES = ("skip", 1.0, 0.0)

_EQUATIONS_DEPRECATION = "equations=True in NormalizationConfig is deprecated"


class _DropEquationsDeprecation(logging.Filter):
    """latex2sympy logs this warning on every parse with the seed's equations=True; keep the seed's
    config (equations=True still changes normalisation) but not the log spam."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _EQUATIONS_DEPRECATION not in str(record.msg)


logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(_DropEquationsDeprecation())


def gold_extraction_config() -> list:
    """The seed's gold extraction: default LaTeX extraction."""
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig()]


def answer_extraction_config() -> list:
    """The seed's completion extraction (strict LaTeX, boxed first, anchors required)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False,
                malformed_operators=False,
                basic_latex=True,
                equations=True,
                boxed="all",
                units=True,
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]


GOLD_FORMATS = ("latex", "gsm8k")


def gsm8k_final_answer(solution: str) -> str | None:
    """GSM8K's gold: the text after the last ``#### `` line (thousands separators dropped); None if absent."""
    finals = [line.strip()[4:].strip() for line in solution.splitlines() if line.strip().startswith("####")]
    return finals[-1].replace(",", "") if finals and finals[-1] else None


def parse_gold(solution: str, *, parsing_timeout: int | None = 5, gold: str = "latex") -> list:
    """Parsed gold answer; an empty list means the gold does not parse.

    gold="latex": the seed's LaTeX extraction of the whole solution (``\\boxed{}`` and friends);
    gold="gsm8k": the ``#### N`` final line, parsed as a plain expression (N may be 1/2, -3.5, ...)."""
    from math_verify import ExprExtractionConfig, parse

    if gold == "gsm8k":
        final = gsm8k_final_answer(solution)
        if final is None:
            return []
        return parse(final, extraction_mode="first_match", parsing_timeout=parsing_timeout,
                     extraction_config=[ExprExtractionConfig(), *gold_extraction_config()])
    return parse(
        solution,
        extraction_mode="first_match",
        extraction_config=gold_extraction_config(),
        parsing_timeout=parsing_timeout,
    )


def parse_answer(completion: str, *, parsing_timeout: int | None = 5) -> list:
    """Parsed model answer; an empty list means nothing was extracted (verify then gives False)."""
    from math_verify import parse

    return parse(
        completion,
        extraction_config=answer_extraction_config(),
        extraction_mode="first_match",
        parsing_timeout=parsing_timeout,
    )


def is_correct(
    completion: str, solution: str, *, parsing_timeout: int | None = 5, verify_timeout: int | None = 5,
    gold: str = "latex",
) -> bool | None:
    """True/False whether the completion's answer equals the gold; None when the gold does not parse."""
    from math_verify import verify

    gold = parse_gold(solution, parsing_timeout=parsing_timeout, gold=gold)
    if len(gold) == 0:
        return None
    answer = parse_answer(completion, parsing_timeout=parsing_timeout)
    return bool(verify(gold, answer, timeout_seconds=verify_timeout))


def check_unparseable_gold_policy(policy: Any) -> str | float:
    """Validate the 'gold does not parse' policy: "skip" (None), 1.0 (the seed) or 0.0."""
    if policy == "skip":
        return "skip"
    if isinstance(policy, (int, float)) and not isinstance(policy, bool) and float(policy) in (0.0, 1.0):
        return float(policy)
    raise ValueError(f"unparseable_gold must be one of {UNPARSEABLE_GOLD_POLICIES}, got {policy!r}")


def make_accuracy_reward(
    *,
    unparseable_gold: str | float = "skip",
    parsing_timeout: int | None = 5,
    verify_timeout: int | None = 5,
    gold: str = "latex",
):
    """Factory for the ``accuracy`` reward.

    unparseable_gold: what a sample whose gold solution does not parse gets -- "skip" returns None
    (newer open-r1; the manager then applies the reward's ``on_none``), 1.0 is the seed recipe,
    0.0 punishes. parsing_timeout/verify_timeout are math-verify's own (signal-based) limits, seconds.
    gold: how the gold answer is read from the solution column: "latex" (the seed: NuminaMath's
    ``\\boxed{}``) or "gsm8k" (the ``#### N`` final line); see :func:`parse_gold`.
    """
    policy = check_unparseable_gold_policy(unparseable_gold)
    if gold not in GOLD_FORMATS:
        raise ValueError(f"gold must be one of {GOLD_FORMATS}, got {gold!r}")

    def accuracy(
        completions: Sequence[Any], *, solutions: Sequence[str] | None = None, **kwargs: Any
    ) -> list[float | None]:
        """1.0 if the completion's answer verifies against the gold, else 0.0 (None: see policy)."""
        if solutions is None:
            raise ValueError("the accuracy reward needs solutions (the dataset's solution column)")
        if len(solutions) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(solutions)} solutions")
        rewards: list[float | None] = []
        for completion, solution in zip(completions, solutions):
            correct = is_correct(
                completion_text(completion),
                solution,
                parsing_timeout=parsing_timeout,
                verify_timeout=verify_timeout,
                gold=gold,
            )
            if correct is None:
                rewards.append(None if policy == "skip" else policy)
            else:
                rewards.append(float(correct))
        return rewards

    return accuracy


accuracy_reward = make_accuracy_reward()
