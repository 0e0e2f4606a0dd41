"""GRPOBatch: DP shards and micro-batches cover every row once; padding rows are empty."""
import pytest
import torch

from megatron_grpo.training.batch import GRPOBatch


def _batch(b=7, t=5):
    ids = torch.arange(b * t).view(b, t)
    mask = torch.zeros(b, t)
    mask[:, 2:] = 1
    return GRPOBatch(input_ids=ids, completion_mask=mask, advantages=torch.arange(b, dtype=torch.float32),
                     old_logprobs=-torch.ones(b, t))


def test_dp_shards_and_micro_batches_partition_rows():
    batch = _batch()
    shards = [batch.shard_for_dp(r, 3) for r in range(3)]
    assert [s.batch_size for s in shards] == [3, 2, 2]
    assert torch.equal(torch.cat([s.input_ids for s in shards]), batch.input_ids)
    mbs = shards[0].micro_batches(2)
    assert [m.batch_size for m in mbs] == [2, 2]
    assert mbs[1].completion_mask[1].sum() == 0 and mbs[1].advantages[1] == 0  # padded row is empty
    assert torch.equal(mbs[0].old_logprobs, shards[0].old_logprobs[:2])


def test_validation():
    batch = _batch()
    with pytest.raises(ValueError):
        GRPOBatch(input_ids=batch.input_ids, completion_mask=batch.completion_mask[:, :3], advantages=batch.advantages)
    bad = batch.completion_mask.clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError):
        GRPOBatch(input_ids=batch.input_ids, completion_mask=bad, advantages=batch.advantages)
    with pytest.raises(ValueError):
        batch.shard_for_dp(3, 3)
