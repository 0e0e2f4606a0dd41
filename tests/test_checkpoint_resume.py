"""Exact resume of the training state through megatron-core dist_checkpointing, without vLLM (so the
Python 3.12 / newest megatron-core lane runs it too): model, optimizer (plain, at TP1xPP2), LR schedule
and RNG come back bit for bit, and so does the distributed optimizer (DP2, 'dp_reshardable'): its Adam
state tensor by tensor, every weight and the losses of the next steps; the checkpoint records the
megatron-core that wrote it."""
import importlib.metadata as md

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.training_helpers import make_model_dir


def test_training_state_resume_is_bit_exact(tmp_path):
    model_dir = make_model_dir(tmp_path / "tiny_qwen2")
    results = run_distributed("tests.dist.checkpoint_resume:resume_exact", 2, warm=True,
                              kwargs={"model_dir": model_dir, "root": str(tmp_path / "ckpts")})
    for rank, rep in enumerate(results):
        assert set(rep) == {"tp1pp2", "tp1pp1_distopt"}, rep
        for name, r in rep.items():
            assert r["load_diff"] == 0.0 and r["loss_diffs"][0] == 0.0, (rank, name, r)  # the model came back exactly
            # main params, exp_avg, exp_avg_sq and Adam's step (bias correction) equal the live optimizer's at the save
            assert r["adam_state_diff"] == 0.0 and {"exp_avg", "exp_avg_sq", "step"} <= set(r["adam_state_keys"]), r
            assert r["loss_diff"] == 0.0 and r["param_diff"] == 0.0, (rank, name, r)
            assert r["written_by"] == md.version("megatron-core"), r
