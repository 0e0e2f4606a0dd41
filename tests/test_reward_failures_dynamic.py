"""Reward failures under dynamic sampling: a reward that raises makes its groups zero-variance, so
dynamic sampling drops and re-draws exactly those groups -- their errors must still be counted in the
step's metrics and their text reported (log line and samples.jsonl), like any other failure."""
import json

import pytest

from megatron_grpo.rewards import RewardManager
from megatron_grpo.trainer.scoring import with_all_rounds
from tests.e2e import metrics, run_train

PLUGIN = "tests.test_reward_failures_dynamic"


def plugin_odd_answer_raises(completions, *, solutions=None, **kwargs):
    """Module level (reward workers import it): raises for an odd answer, else a varied reward."""
    out = []
    for text, sol in zip(completions, solutions):
        if int(sol.removeprefix("\\boxed{").removesuffix("}")) % 2:
            raise ValueError(f"odd answer {sol}")
        out.append(float(len(text) % 3))
    return out


def test_failures_of_every_round_are_kept():
    specs = [{"name": f"{PLUGIN}:plugin_odd_answer_raises", "label": "odd"}]
    with RewardManager(specs, num_workers=0) as manager:  # in-process: the merge, not the pool, is under test
        first = manager.compute(["a", "bb"], solutions=["\\boxed{2}", "\\boxed{3}"])
        second = manager.compute(["a", "bb", "c"], solutions=["\\boxed{2}", "\\boxed{4}", "\\boxed{5}"])
        clean = manager.compute(["a"], solutions=["\\boxed{2}"])
    assert first.failures["odd"]["errors"] == 1 and clean.failures == {}
    merged = with_all_rounds(clean, [first, second, clean])  # the kept batch had no failure itself
    assert merged.failures["odd"] == {"sample": 1, "kind": "error", "message": "ValueError: odd answer \\boxed{3}",
                                      "errors": 2, "timeouts": 0, "batch": 1}
    assert merged.metrics["reward/odd/errors"] == 2.0 == manager.counters["reward/odd/errors"]
    assert merged.total == clean.total and merged.rewards == clean.rewards  # only the reports change


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_trainer_reports_failures_of_dropped_groups(assets, tmp_path):
    out = tmp_path / "run"
    rewards = f"rewards.functions=[{{name: '{PLUGIN}:plugin_odd_answer_raises', label: odd}}]"
    proc = run_train(*assets, f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.eval_steps=0",
                     "checkpoint.save_steps=0", "trainer.export_at_end=false", "trainer.samples_every=0",
                     "algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_batches=3", rewards,
                     timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # every round's errors are in the step's count: the steps add up to the run's cumulative counter
    assert sum(r["reward/odd/errors"] for r in rows) == rows[-1]["reward/odd/errors_total"] > 0
    assert any(r["dynamic_sampling/batches"] > 1 for r in rows)  # odd-answer groups were dropped and re-drawn
    reported = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        said = [line for line in proc.stdout.splitlines() if f"reward 'odd' step {r['step']}:" in line]
        assert len(said) == 1 and f"{int(r['reward/odd/errors'])} error(s)" in said[0], proc.stdout[-3000:]
        assert "ValueError: odd answer" in said[0]
        rec = [x for x in reported if x["step"] == r["step"] and x.get("reward_failure") == "odd"]
        assert len(rec) == 1 and rec[0]["errors"] == r["reward/odd/errors"] and rec[0]["batch"] >= 1
        assert rec[0]["message"].startswith("ValueError: odd answer")
