"""Fewer and cheaper forward passes per GRPO step: the on-policy shortcut (old logprobs = the
training forward's own) and token-budget micro-batches, on real megatron-core under torchrun."""
import json

import pytest
import torch

from megatron_grpo.testing.torchrun import run_distributed
from megatron_grpo.training.token_budget import balance_dp, padded_tokens, plan_micro_batches, row_lengths
from tests.dist.training_helpers import make_model_dir


def test_plan_covers_rows_once_under_budget_longest_first():
    lengths = [5, 40, 7, 3, 40, 12, 9, 2, 33, 6, 8, 4]
    for budget in (1, 20, 40, 64, 96, 200, 10_000):
        groups = plan_micro_batches(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:  # under budget unless a single row is longer than it
            assert len(g) * max(lengths[i] for i in g) <= budget or len(g) == 1
        # longest first: group maxima never increase
        maxima = [max(lengths[i] for i in g) for g in groups]
        assert maxima == sorted(maxima, reverse=True)
        # no more micro-batches than plain greedy filling in sorted order would need
        greedy, cur = 0, []
        for x in sorted(lengths, reverse=True):
            if cur and (len(cur) + 1) * cur[0] > budget:
                greedy, cur = greedy + 1, []
            cur.append(x)
        assert len(groups) == greedy + 1
    # long-tailed: far less padding than rows of 4 padded to the batch's longest row
    assert padded_tokens(lengths, plan_micro_batches(lengths, 96)) < 0.6 * (len(lengths) * max(lengths))
    assert plan_micro_batches([], 10) == []
    with pytest.raises(ValueError):
        plan_micro_batches([3], 0)


def test_balanced_plan_has_no_oversized_micro_batch():
    # greedy would give [40,40] (80), [33,12] (66), [9..2] tiny; balancing evens them out at the same count
    lengths = [40, 40, 33, 12, 9, 8, 7, 6, 5, 4, 3, 2]
    groups = plan_micro_batches(lengths, 80)
    costs = [len(g) * max(lengths[i] for i in g) for g in groups]
    assert max(costs) <= 80 and len(groups) == 3


def test_dp_balance_by_tokens_and_row_lengths():
    lengths = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 90]
    parts = balance_dp(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(12))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 10  # contiguous halves would be 150 vs 140 here, rows 6/6 ...
    assert all(p == sorted(p) for p in parts)
    assert all(len(p) > 0 for p in balance_dp([1000, 1, 1, 1], 4))
    mask = torch.zeros(3, 6)
    mask[0, 2:4] = 1
    mask[1, 1:6] = 1
    assert row_lengths(mask) == [4, 6, 1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_qwen2"))


def test_on_policy_shortcut_exact_and_token_budget_exact_pp2_dp2(model_dir):
    """TP1xPP2 and DP2: the shortcut is bit-identical to the separate old pass with one forward pass
    fewer; token-budget micro-batches (incl. token-balanced DP shards) give the fixed micro-batches'
    loss and gradients with less padding."""
    results = run_distributed("tests.dist.training_passes:passes", 2, warm=True, kwargs={"model_dir": model_dir})
    rep = results[0]
    print(json.dumps(rep, indent=1))
    for key in ("tp1pp2dp1", "tp1pp1dp2"):
        assert rep[f"{key}_budget"]["padding_budget"] < rep[f"{key}_budget"]["padding_fixed"]
        on = rep[f"{key}_onpolicy"]
        assert on["forward_calls_full"] > on["forward_calls_shortcut"]
    assert results[1]["tp1pp2dp1_onpolicy"]["loss"] == rep["tp1pp2dp1_onpolicy"]["loss"]


def test_bad_token_budget_is_one_config_error():
    from megatron_grpo.config import load_config, validate
    from megatron_grpo.config.validate import ConfigError

    cfg = load_config("configs/grpo_tiny_cpu.yaml", ["algorithm.max_tokens_per_microbatch=0"])
    with pytest.raises(ConfigError, match="algorithm.max_tokens_per_microbatch=0 must be > 0"):
        validate(cfg, check_paths=False)
    validate(load_config("configs/grpo_tiny_cpu.yaml", ["algorithm.max_tokens_per_microbatch=512"]),
             check_paths=False)
