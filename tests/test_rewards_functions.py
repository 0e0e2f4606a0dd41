"""Hand-computed values for the format and shaping rewards (open-r1 definitions)."""
import math

import pytest

from megatron_grpo.rewards import build_reward


def test_format_seed_variant():
    reward = build_reward("format")  # seed regex, no flags
    completions = [
        "<think>3 plus 5</think><answer>8</answer>",
        "<think>a\nb</think><answer>8</answer>",  # "." does not cross newlines in the seed regex
        "<think>a</think><answer>8</answer> trailing",
        "<think></think><answer></answer>",
        "<answer>8</answer>",
        "",
    ]
    assert reward(completions, solutions=None) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_format_open_r1_variant():
    reward = build_reward("format", variant="open_r1")
    completions = [
        "<think>\nline one\nline two\n</think>\n<answer>\n8\n</answer>",
        "<think>a</think><answer>8</answer>",
        "<think>\na\n</think>\n<answer>\n8\n</answer>\nextra",  # MULTILINE "$" (open-r1 quirk)
        "<think>\na\n</think><answer>\n8\n</answer>",
    ]
    assert reward(completions, solutions=None) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="variant"):
        build_reward("format", variant="strict")


def test_tag_count():
    reward = build_reward("tag_count")
    completions = [
        "<think>\nx\n</think>\n<answer>\ny\n</answer>",  # all four once
        "<think>\nx\n</think>\n",  # two
        "<think>\n<think>\n\n</think>\n",  # "<think>\n" twice -> 0; "\n</think>\n" once -> 0.25
        "<think>x</think><answer>y</answer>",  # no newline forms
        "",
    ]
    assert reward(completions, solutions=None) == [1.0, 0.5, 0.25, 0.0, 0.0]
    bare = build_reward("tag_count", newline_tags=False)
    assert bare(["<think>x</think><answer>y</answer>", "<think><think>"], solutions=None) == [1.0, 0.0]


def test_reasoning_steps():
    reward = build_reward("reasoning_steps")
    completions = [
        "Step 1: add. Step 2: check.",  # 2
        "1. first\n- a\n- b\nFinally, done",  # "1." at start, two "\n-", "Finally," -> 4
        "2. x\n3. y",  # only the "2." at the very start counts (no MULTILINE)
        "First, Second, Next,",  # 3
        "",
    ]
    assert reward(completions, solutions=None) == pytest.approx([2 / 3, 1.0, 1 / 3, 1.0, 0.0])


def test_length_kimi_batch_and_groups():
    reward = build_reward("length")
    a = "\\boxed{1}"  # 9 chars, correct
    b = "\\boxed{2}" + " " * 4  # 13, wrong
    c = "\\boxed{1}" + " " * 8  # 17, correct
    d = "\\boxed{3}" + " " * 2  # 11, wrong
    solutions = ["$1$"] * 4
    # whole batch: min 9, max 17
    got = reward([a, b, c, d], solutions=solutions)
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0])  # b: lam 0 -> min(0, 0); d: lam 0.25 -> 0
    # per group (Kimi: over one prompt's samples): {a, b} and {c, d}
    got = reward([a, b, c, d], solutions=solutions, group_ids=[0, 0, 1, 1])
    assert got == pytest.approx([0.5, -0.5, -0.5, 0.0])
    assert reward([a, a], solutions=["$1$", "$2$"]) == [0.0, 0.0]  # equal lengths
    # unparseable gold: open-r1 treats it as correct; "skip" gives None
    assert reward([a, c], solutions=["no math", "no math"]) == pytest.approx([0.5, -0.5])
    skip = build_reward("length", unparseable_gold="skip")
    assert skip([a, c], solutions=["no math", "$1$"]) == [None, -0.5]
    tokens = build_reward("length", use_token_lengths=True)
    assert tokens([a, d], solutions=["$1$", "$1$"], completion_lengths=[10, 2]) == pytest.approx([-0.5, 0.0])


def test_cosine():
    reward = build_reward("cosine", max_len=20)
    half_right = "\\boxed{1}" + " "  # 10 = max_len / 2 -> cos = 0
    full_right = "\\boxed{1}" + " " * 11  # 20 = max_len -> cos = -1
    half_wrong = "\\boxed{2}" + " "
    full_wrong = "\\boxed{2}" + " " * 11
    double_right = "\\boxed{1}" + " " * 31  # 40 = 2 * max_len
    got = reward([half_right, full_right, half_wrong, full_wrong, double_right], solutions=["$1$"] * 5)
    # correct: 0.5 + 0.25 (1 + cos); wrong: -0.5 - 0.25 (1 + cos)
    assert got == pytest.approx([0.75, 0.5, -0.75, -0.5, 0.5])
    unclamped = build_reward("cosine", max_len=20, clamp=False)
    assert unclamped([double_right], solutions=["$1$"]) == pytest.approx([1.0])  # open-r1 wraps around
    short = "\\boxed{1}"  # 9 chars at default max_len 1000
    expected = 0.5 + 0.25 * (1 + math.cos(9 / 1000 * math.pi))
    assert build_reward("cosine")([short], solutions=["$1$"]) == pytest.approx([expected])
    assert build_reward("cosine")([short], solutions=["no math"]) == [1.0]
    assert build_reward("cosine", unparseable_gold="skip")([short], solutions=["no math"]) == [None]


def test_repetition_penalty():
    reward = build_reward("repetition_penalty", ngram_size=2, max_penalty=-1.0)
    # bigrams of "a b a b": (a,b) (b,a) (a,b) -> 2 distinct of 3 -> -(1 - 2/3)
    got = reward(["a b a b", "A b a B", "a", "", "a b c d"], solutions=None)
    assert got == pytest.approx([-1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    tri = build_reward("repetition_penalty", ngram_size=3, max_penalty=-0.5)
    # "x y z x y z x y z": 7 trigrams, 3 distinct -> -0.5 * 4/7
    assert tri(["x y z x y z x y z", "a b c"], solutions=None) == pytest.approx([-0.5 * 4 / 7, 0.0])
    with pytest.raises(ValueError, match="positive"):
        build_reward("repetition_penalty", ngram_size=3, max_penalty=0.5)


def test_soft_overlong_punishment():
    reward = build_reward("soft_overlong_punishment", max_completion_len=10, soft_punish_cache=4)
    completions = ["c"] * 6
    lengths = [1, 6, 7, 8, 10, 11]
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert reward(completions, solutions=None, completion_lengths=lengths) == pytest.approx(expected)
    ids = [[0] * n for n in lengths]
    assert reward(completions, solutions=None, completion_ids=ids) == pytest.approx(expected)
    with pytest.raises(ValueError, match="token lengths"):
        reward(completions, solutions=None)
    with pytest.raises(ValueError, match="soft_punish_cache"):
        build_reward("soft_overlong_punishment", max_completion_len=4, soft_punish_cache=5)
