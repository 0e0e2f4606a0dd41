"""The demo's task ("Which is larger, a or b?"): every problem once, disjoint held-out split, gold
answers that math-verify accepts, and the worked solution the warm start writes."""
from megatron_grpo.data.loading import load_prompt_dataset
from megatron_grpo.data.synthetic import all_problems, make_synthetic_splits, write_synthetic_dataset
from megatron_grpo.trainer.warm_start import worked_solution


def test_larger_task_problems_and_splits(tmp_path):
    from megatron_grpo.rewards import build_reward

    problems = all_problems("larger")
    assert len(problems) == 90 and len({p["problem"] for p in problems}) == 90
    for p in problems:
        a, b = p["problem"].removeprefix("Which is larger, ").removesuffix("?").split(" or ")
        assert p["answer"] == str(max(int(a), int(b))) and p["solution"] == f"\\boxed{{{p['answer']}}}"
    write_synthetic_dataset(tmp_path / "d", n_train=200, n_test=30, seed=42, task="larger")
    splits = load_prompt_dataset(str(tmp_path / "d"))
    assert len(splits.train) == 200 and len(splits.test) == 30
    assert not set(splits.train["problem"]) & set(splits.test["problem"])  # held out: never trained on
    assert len(set(splits.train["problem"])) == 60  # the other 60 problems, each repeated evenly
    golds = splits.test["solution"]
    accuracy = build_reward("accuracy")
    assert accuracy([f"<think>x</think><answer>{g}</answer>" for g in golds], solutions=golds) == [1.0] * 30
    # the default task is unchanged
    assert make_synthetic_splits(n_train=5, n_test=3, seed=1)[1][0]["problem"].startswith("What is ")


def test_worked_solutions():
    assert worked_solution("Which is larger, 3 or 7?", "7") == \
        "<think>max(3, 7) = 7</think><answer>\\boxed{7}</answer>"
    assert worked_solution("What is 3 + 5?", "8") == "<think>3 + 5 = 8</think><answer>\\boxed{8}</answer>"
