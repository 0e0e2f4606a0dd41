"""model.recompute=full (the seed recipe's gradient checkpointing) on the CPU platform layer."""
from megatron_grpo.testing.torchrun import run_distributed


def test_full_recompute_gradients_equal_no_recompute(tmp_path):
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    model = make_tiny_model(tmp_path / "model", TinyModelSpec(arch="qwen2"))
    r = run_distributed("tests.dist.recompute_body:recompute_grads", 1, warm=True, workdir=tmp_path,
                        kwargs={"model_dir": str(model)})[0]
    assert r["recomputed_backwards"] >= 2, r  # one checkpointed chunk per layer was re-run in backward
    assert r["same_names"] and r["params"] > 0 and r["grad_max_abs"] > 0, r
    assert r["loss_diff"] == 0.0 and r["grad_max_abs_diff"] <= 1e-6, r
