"""Vocab-parallel logprobs/entropy at TP=2 equal the single-rank full-vocab reference (<= 1e-5).

One torchrun launch covers: temperature, padded vocab (incl. a rank that holds only padding rows),
chunk sizes that do not divide the token count, in-place and copying backward, gradients w.r.t.
each rank's logits shard, bf16 input, and megatron-core's vocab_parallel_cross_entropy.
"""
from megatron_grpo.testing.torchrun import run_distributed


def test_vocab_parallel_logprobs_tp2_parity():
    results = run_distributed("tests.dist.logprobs_parity:parity", 2, warm=True)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["max_error"] <= 1e-5, r["errors"]
        assert len(r["errors"]) == 3 * 2 * 3 * 2 + 2  # every case ran
