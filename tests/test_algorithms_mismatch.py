"""Trainer-vs-rollout mismatch statistics (hand values) and the step-1 parity decision."""
import math

import pytest
import torch

from megatron_grpo.algorithms import (MISMATCH_LIMITS, MismatchLimits, finalize_metrics, mismatch_violations,
                                      rollout_mismatch_metrics)


def _batch():
    lp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -4.0, 0.0]], dtype=torch.float64)
    rollout = torch.tensor([[0.0, -1.1, -2.0, -0.5 + math.log(4.0)], [0.0, -0.3 - 0.2, -4.0 + 0.69, 9.0]],
                           dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    return lp, rollout, mask


def test_hand_values_and_mask():
    lp, rollout, mask = _batch()
    f = finalize_metrics(rollout_mismatch_metrics(lp, rollout, mask))
    diffs = [0.1, 0.0, math.log(4.0), 0.2, 0.69]  # the masked 9.0 never counts
    assert f["rollout_logprob_abs_diff"] == pytest.approx(sum(diffs) / 5)
    assert f["rollout_logprob_abs_diff_max"] == pytest.approx(math.log(4.0))
    assert f["token_mult_prob_error"] == pytest.approx(sum(math.exp(d) for d in diffs) / 5)
    # ratio outside [1/2, 2]: only log(4) (0.69 < log 2 = 0.693 stays inside)
    assert f["rollout_ratio_outside_frac"] == pytest.approx(1 / 5)
    f3 = finalize_metrics(rollout_mismatch_metrics(lp, rollout, mask, band=1.9))
    assert f3["rollout_ratio_outside_frac"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        rollout_mismatch_metrics(lp, rollout, mask, band=1.0)


def test_violations_and_defaults():
    lim = MismatchLimits(mean_abs=1e-2, ratio_outside_frac=1e-3)
    assert mismatch_violations({"rollout_logprob_abs_diff": 3e-3, "rollout_ratio_outside_frac": 0.0}, lim) == []
    bad = mismatch_violations({"rollout_logprob_abs_diff": 0.12, "rollout_ratio_outside_frac": 0.5}, lim)
    assert [b.split("=")[0] for b in bad] == ["rollout_logprob_abs_diff", "rollout_ratio_outside_frac"]
    assert mismatch_violations({"rollout_logprob_abs_diff": float("nan")}, lim)  # NaN never passes
    # the defaults separate the measured correct runs from the measured skipped syncs (README)
    for dtype, correct, skipped in (("float32", 5.8e-7, 0.120), ("bfloat16", 3.3e-3, 0.126)):
        assert correct * 5 < MISMATCH_LIMITS[dtype].mean_abs < skipped / 5


def _cfg(**trainer):
    from megatron_grpo.config import load_config
    from tests.e2e import CONFIG

    return load_config(CONFIG, ["model.dtype=bfloat16", *(f"trainer.{k}={v}" for k, v in trainer.items())])


def test_check_rollout_parity_passes_rounding_and_fails_drift():
    from megatron_grpo.trainer.parity import LogprobParityError, check_rollout_parity, parity_limits

    assert parity_limits(_cfg()) == MISMATCH_LIMITS["bfloat16"]
    assert parity_limits(_cfg(logprob_check_mean_abs=0.5)).mean_abs == 0.5
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(16, 40, generator=g) * 3
    mask = torch.ones(16, 40)
    mask[:, 0] = 0
    rounding = lp + 4e-3 * torch.randn(16, 40, generator=g)  # bf16-like noise
    lines = []
    stats = check_rollout_parity(_cfg(), lp, rounding, mask, log=lines.append)
    assert stats["rollout_logprob_abs_diff"] < 1e-2 and "step-1 logprob parity" in lines[0]
    with pytest.raises(LogprobParityError, match="rollout_logprob_abs_diff="):
        check_rollout_parity(_cfg(), lp, lp + 0.15 * torch.randn(16, 40, generator=g), mask, log=lines.append)
    with pytest.raises(LogprobParityError, match="logprob_check_tolerance"):  # the optional max-abs limit
        check_rollout_parity(_cfg(logprob_check_tolerance=1e-3), lp, rounding, mask, log=lines.append)
    assert isinstance(LogprobParityError("x"), ValueError)  # the CLI reports it as one error: line
