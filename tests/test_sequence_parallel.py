"""Sequence parallelism at TP=2 without TransformerEngine (local spec + models/norms.py), fp32:
logprobs, entropies, losses and every DDP-reduced gradient equal SP off, also for a sequence length
that is not a multiple of TP (padded by the step and by compute_logprobs, then dropped)."""
import pytest

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.training_helpers import make_model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    qwen3 = TinyModelSpec(arch="qwen3", vocab_size=500, num_layers=2, hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.05)
    return [make_model_dir(tmp_path_factory.mktemp("tiny_qwen2")),
            str(make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), qwen3, overwrite=True))]


def test_sequence_parallel_equals_off_at_tp2(model_dirs):
    results = run_distributed("tests.dist.sp_bodies:sp_parity", 2, warm=True, kwargs={"model_dirs": model_dirs})
    rep = results[0]
    print(rep)
    assert rep["sp_norms"] == {"qwen2": 2 * 2 + 1, "qwen3": 4 * 2 + 1}  # per layer: 2 (+ q/k); final norm
    for arch in ("qwen2", "qwen3"):
        for seq in (12, 11):
            r = rep[f"{arch}_seq{seq}"]
            assert r["same_params"]
            assert r["logprob_err"] <= 1e-5 and r["entropy_err"] <= 1e-5, r
            assert r["grad_err"] <= 1e-5 and r["loss_err"] <= 1e-6, r
            assert r["norm_grad_max"] > 1e-3, r  # the norm gradients compared are not trivially zero
    assert all(r == rep for r in results)
