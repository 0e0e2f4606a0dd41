"""`make demo` (python -m megatron_grpo.demo, configs/grpo_demo_cpu.yaml) as a user runs it: GRPO makes
the warm-started tiny model right more often on held-out prompts it never trained on (issue 17)."""
import json
import os
import subprocess

import pytest

from tests.e2e import REPO, env, metrics



def test_largest_task_problems_splits_and_gold(tmp_path):
    """The demo's task: every problem once, answer = the largest of the prompt's numbers, held-out split
    disjoint from train, gold answers math-verify accepts; the warm start's completions."""
    from megatron_grpo.data.loading import load_prompt_dataset
    from megatron_grpo.data.synthetic import all_problems, make_synthetic_splits, prompt_numbers, write_synthetic_dataset
    from megatron_grpo.rewards import build_reward
    from megatron_grpo.trainer.warm_start import worked_solution

    problems = all_problems("largest")
    assert len(problems) == len({p["problem"] for p in problems}) == 10 * 9 * 8 * 7 * 6
    for p in problems[::97]:
        numbers = prompt_numbers(p["problem"])
        assert len(set(numbers)) == 5 and p["answer"] == max(numbers, key=int) and p["solution"] == f"\\boxed{{{p['answer']}}}"
    write_synthetic_dataset(tmp_path / "d", n_train=300, n_test=64, seed=42, task="largest")
    splits = load_prompt_dataset(str(tmp_path / "d"))
    assert len(splits.train) == 300 and len(splits.test) == 64
    assert not set(splits.train["problem"]) & set(splits.test["problem"])  # held out: never trained on
    golds = splits.test["solution"]
    assert build_reward("accuracy")([f"<think>x</think><answer>{g}</answer>" for g in golds], solutions=golds) == [1.0] * 64
    assert worked_solution("Largest of 3 8 1 5 9?", "8") == "<think>8</think><answer>\\boxed{8}</answer>"
    assert worked_solution("What is 3 + 5?", "8") == "<think>3 + 5 = 8</think><answer>\\boxed{8}</answer>"
    assert make_synthetic_splits(n_train=5, n_test=3, seed=1)[1][0]["problem"].startswith("What is ")  # default task


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.usefixtures("no_shm_leak")  # see tests/conftest.py
def test_demo_learns_and_export_beats_start(tmp_path):
    """Held-out pass@1 after GRPO >= 3x before and >= 0.30, on >= 64 held-out prompts; the demo prints
    the before/after table and the curves, and says it learned."""
    from omegaconf import OmegaConf

    out = tmp_path / "demo"
    proc = subprocess.run(
        [os.sys.executable, "-m", "megatron_grpo.demo", f"trainer.output_dir={out}",
         f"model.path={tmp_path / 'model'}", f"data.path={tmp_path / 'data'}"],
        capture_output=True, text=True, cwd=REPO, env=env(), timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    shipped = OmegaConf.load(REPO / "configs" / "grpo_demo_cpu.yaml")
    rows = metrics(out / "demo_run")
    assert [r["step"] for r in rows] == list(range(1, shipped.trainer.max_steps + 1))
    start = json.loads((out / "demo_run" / "eval_initial.json").read_text())
    final = json.loads((out / "demo_run" / "eval_final.json").read_text())
    assert start["eval/num_prompts"] == final["eval/num_prompts"] >= 64
    before, after = start["eval/pass@1"], final["eval/pass@1"]
    assert after >= 3 * before and after >= 0.30, (before, after)
    assert final["eval/accuracy"] > start["eval/accuracy"]
    for shown in ("training curves", "eval/pass@1", "eval/pass@8", "demo: learned"):
        assert shown in proc.stdout, shown
