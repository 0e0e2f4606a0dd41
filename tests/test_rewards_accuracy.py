"""The accuracy reward agrees with math-verify called directly with the seed's configs."""
import pytest
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

from megatron_grpo.rewards import RewardManager, make_accuracy_reward

# Written out independently of megatron_grpo.rewards.math_accuracy, from the seed recipe.
SEED_ANSWER_CONFIG = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]


# These tests are about what is parsed and verified, not about limits: math-verify's signal-based timeouts
# count wall seconds (5 by default), which a loaded CI machine can exceed (seen: an interval gold reported
# unparseable at a 1-minute load of 24 on 2 cores). Both sides get the same generous limits.
LIMIT_S = 120
LIMITS = dict(parsing_timeout=LIMIT_S, verify_timeout=LIMIT_S)


def direct_reward(completion: str, solution: str, unparseable):
    gold = parse(solution, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=LIMIT_S)
    if len(gold) == 0:
        return None if unparseable == "skip" else float(unparseable)
    answer = parse(completion, extraction_config=SEED_ANSWER_CONFIG, extraction_mode="first_match",
                   parsing_timeout=LIMIT_S)
    return float(verify(gold, answer, timeout_seconds=LIMIT_S))


# (completion, gold solution)
CASES = [
    ("\\boxed{8}", "$8$"),
    ("\\boxed{7}", "$8$"),
    ("<think>3+5</think><answer>\\boxed{8}</answer>", "$\\boxed{8}$"),
    ("The answer is $\\boxed{\\frac{1}{2}}$", "$\\frac{1}{2}$"),
    ("\\boxed{0.5}", "$\\frac{1}{2}$"),
    ("\\boxed{\\frac{2}{4}}", "$\\frac12$"),
    ("\\boxed{1/2}", "$\\frac{1}{2}$"),
    ("\\boxed{0.3333}", "$\\frac{1}{3}$"),
    ("\\boxed{\\dfrac{3}{4}}", "$0.75$"),
    ("\\boxed{0.75}", "$\\frac{3}{4}$"),
    ("\\boxed{\\frac{3}{5}}", "$\\frac{3}{4}$"),
    ("\\boxed{25\\%}", "$0.25$"),
    ("\\boxed{5 \\text{ cm}}", "$5$"),
    ("\\boxed{5\\,\\mathrm{m}}", "$5$"),
    ("\\boxed{10 \\text{ dollars}}", "$10$"),
    ("\\boxed{90^\\circ}", "$90$"),
    ("\\boxed{\\{1, 2, 3\\}}", "$\\{1,2,3\\}$"),
    ("\\boxed{\\{3, 2, 1\\}}", "$\\{1,2,3\\}$"),
    ("\\boxed{\\{1, 2\\}}", "$\\{1,2,3\\}$"),
    ("\\boxed{(0, 1]}", "$(0,1]$"),
    ("\\boxed{[0, 1]}", "$(0,1]$"),
    ("\\boxed{(-\\infty, 2)}", "$(-\\infty,2)$"),
    ("\\boxed{x < 2}", "$(-\\infty,2)$"),
    ("\\boxed{1} and later \\boxed{2}", "$1$"),
    ("\\boxed{2} and later \\boxed{1}", "$1$"),
    ("\\boxed{1, 2}", "$1, 2$"),
    ("\\boxed{x = 3}", "$3$"),
    ("\\boxed{3}", "$x = 3$"),
    ("\\boxed{\\sqrt{2}}", "$\\sqrt{2}$"),
    ("\\boxed{1.41421356}", "$\\sqrt{2}$"),
    ("\\boxed{2\\sqrt{2}}", "$\\sqrt{8}$"),
    ("\\boxed{\\pi}", "$\\pi$"),
    ("\\boxed{3.14}", "$\\pi$"),
    ("\\boxed{x^2 + 2x + 1}", "$(x+1)^2$"),
    ("\\boxed{x^2 + 1}", "$(x+1)^2$"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "$\\frac{\\sqrt3}{2}$"),
    ("\\boxed{-4}", "$-4$"),
    ("\\boxed{4}", "$-4$"),
    ("\\boxed{1,000}", "$1000$"),
    ("\\boxed{1e3}", "$1000$"),
    ("\\boxed{\\begin{pmatrix}1 \\\\ 2\\end{pmatrix}}", "$\\begin{pmatrix}1\\\\2\\end{pmatrix}$"),
    ("The final answer is $8$", "$8$"),
    ("8", "$8$"),
    ("<answer>8</answer>", "$8$"),
    ("$8$", "$8$"),
    ("\\boxed{\\frac{1}{2}", "$\\frac{1}{2}$"),
    ("\\boxed{\\frac{1}{}}", "$\\frac{1}{2}$"),
    ("\\boxed{2+}", "$2$"),
    ("\\boxed{}", "$2$"),
    ("", "$2$"),
    ("   ", "$2$"),
    ("\\boxed{a}", "$a$"),
    ("\\boxed{A}", "$\\text{(A)}$"),
    ("\\boxed{\\infty}", "$\\infty$"),
    ("\\boxed{8}", "The answer is eight"),
    ("\\boxed{8}", ""),
    ("\\boxed{8}", "no math here at all"),
    ("\\boxed{1}", "$\\frac{}{}$"),
]


def test_enough_varied_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("policy", ["skip", 1.0, 0.0])
def test_accuracy_reward_matches_math_verify(policy):
    reward = make_accuracy_reward(unparseable_gold=policy, **LIMITS)
    completions = [c for c, _ in CASES]
    solutions = [s for _, s in CASES]
    got = reward(completions, solutions=solutions)
    expected = [direct_reward(c, s, policy) for c, s in CASES]
    mismatches = [(c, s, g, e) for (c, s), g, e in zip(CASES, got, expected) if g != e]
    assert not mismatches
    # the case list exercises both outcomes and unparseable golds
    assert 1.0 in got and 0.0 in got
    unparseable = [i for i, (_, s) in enumerate(CASES) if direct_reward("", s, "skip") is None]
    assert len(unparseable) >= 2
    assert all(got[i] == (None if policy == "skip" else policy) for i in unparseable)


def test_known_values():
    reward = make_accuracy_reward(**LIMITS)
    got = reward(["\\boxed{0.5}", "\\boxed{7}", "The answer is 8", "\\boxed{8}"],
                 solutions=["$\\frac{1}{2}$", "$8$", "$8$", "nothing"])
    assert got == [1.0, 0.0, 0.0, None]


def test_chat_format_completions_accepted():
    reward = make_accuracy_reward()
    assert reward([[{"role": "assistant", "content": "\\boxed{8}"}]], solutions=["$8$"]) == [1.0]


def test_bad_policy_and_missing_solutions_rejected():
    with pytest.raises(ValueError, match="unparseable_gold"):
        make_accuracy_reward(unparseable_gold=0.5)
    with pytest.raises(ValueError, match="solutions"):
        make_accuracy_reward()(["\\boxed{1}"], solutions=None)


def test_manager_workers_agree_with_in_process():
    completions = [c for c, _ in CASES]
    solutions = [s for _, s in CASES]
    # the same generous math-verify limits as the direct calls (CI failed once with the 5 s defaults: a loaded
    # worker reported "Timeout during parsing" and scored a correct interval 0.0); the hard per-call limit above them
    spec = {"name": "accuracy", "on_none": "exclude", "params": LIMITS}
    with RewardManager([spec], num_workers=2, timeout_s=4 * LIMIT_S) as manager:
        result = manager.compute(completions, solutions=solutions)
    expected = [direct_reward(c, s, "skip") for c, s in CASES]
    assert result.rewards["accuracy"] == expected
    assert result.excluded == [e is None for e in expected]
    assert result.total == [e or 0.0 for e in expected]
    assert result.metrics["reward/accuracy/none"] == sum(e is None for e in expected)
