"""Rollout -> training tensors, loss masks and dynamic-sampling group selection (hand-checked)."""
import torch

from megatron_grpo.rewards import RewardBatchResult
from megatron_grpo.rollout.types import RolloutBatch
from megatron_grpo.trainer import batching
from megatron_grpo.trainer.loop import merge_informative


def _batch():
    return RolloutBatch(
        group_size=2, prompt_indices=[0, 0, 1, 1],
        prompt_token_ids=[[5, 6], [5, 6], [7], [7]],
        completion_token_ids=[[1, 2, 3], [4], [8, 9], []],
        completion_texts=["a", "b", "c", ""],
        rollout_logprobs=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6], []],
        finish_reasons=["stop", "length", "stop", "stop"],
    )


def test_rollout_to_tensors_layout():
    t = batching.rollout_to_tensors(_batch(), pad_id=0)
    assert t.input_ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 0, 0], [7, 8, 9, 0, 0], [7, 0, 0, 0, 0]]
    assert t.completion_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert torch.allclose(t.rollout_logprobs[0], torch.tensor([0, 0, -0.1, -0.2, -0.3]))
    assert torch.allclose(t.rollout_logprobs[2], torch.tensor([0, -0.5, -0.6, 0, 0]))
    assert t.completion_lengths.tolist() == [3, 1, 2, 0]
    assert t.truncated.tolist() == [False, True, False, False]


def test_loss_mask_drops_excluded_and_overlong():
    t = batching.rollout_to_tensors(_batch(), pad_id=0)
    m = batching.loss_mask(t, excluded=[False, False, True, False], overlong_filtering=True)
    assert m.sum(dim=1).tolist() == [3, 0, 0, 0]  # row 1 truncated, row 2 excluded
    m = batching.loss_mask(t, excluded=[False] * 4, overlong_filtering=False)
    assert m.sum(dim=1).tolist() == [3, 1, 2, 0]


def test_informative_groups_and_merge():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert batching.informative_groups(rewards, 2) == [1]
    b = _batch()
    sel = batching.select_groups(b, [1])
    assert sel.prompt_indices == [1, 1] and sel.completion_texts == ["c", ""]
    r1 = RewardBatchResult(rewards={"f": [1.0, 1.0, 0.0, 1.0]}, total=[1.0, 1.0, 0.0, 1.0],
                           excluded=[False] * 4, metrics={})
    r2 = RewardBatchResult(rewards={"f": [0.0, 1.0, 1.0, 1.0]}, total=[0.0, 1.0, 1.0, 1.0],
                           excluded=[False, True, False, False], metrics={})
    kept = [batching.select_groups(b, [1]), batching.select_groups(b, [0])]
    merged, res = merge_informative(kept, [(r1, [1]), (r2, [0])], 2, wanted=2)
    assert merged.prompt_indices == [1, 1, 0, 0]
    assert res.total == [0.0, 1.0, 0.0, 1.0] and res.excluded == [False, False, False, True]
    merged, res = merge_informative(kept, [(r1, [1]), (r2, [0])], 2, wanted=1)  # capped at `wanted` prompts
    assert merged.num_prompts == 1 and res.total == [0.0, 1.0]
