"""Clipped surrogate, clip-higher, dual clip, truncated IS and entropy bonus, by hand."""
import math

import pytest
import torch

from megatron_grpo.algorithms import policy_loss, truncated_is_weights

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def run(ratios, advs, **kw):
    """One sequence per token: old logprob 0, so logprob = log(ratio)."""
    lp = t([[math.log(r)] for r in ratios]).requires_grad_()
    old = torch.zeros_like(lp)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, info = policy_loss(lp, old, t(advs), mask, **kw)
    loss.sum().backward()
    return loss[:, 0].tolist(), lp.grad[:, 0].tolist(), info


def test_clipped_surrogate_hand_values_eps_0_2():
    #          A>0 in   A>0 high  A>0 low   A<0 low  A<0 high  A<0 in
    ratios = [1.1,     1.5,      0.5,      0.5,     1.5,      0.9]
    advs = [1.0,      1.0,      1.0,      -1.0,    -1.0,     -1.0]
    loss, grad, info = run(ratios, advs, eps_low=0.2)
    # -min(rA, clip(r, 0.8, 1.2) A)
    assert loss == pytest.approx([-1.1, -1.2, -0.5, 0.8, 1.5, 0.9], abs=1e-12)
    # d loss / d logpi = -A r where unclipped, 0 where the clipped branch is active
    assert grad == pytest.approx([-1.1, 0.0, -0.5, 0.0, 1.5, 0.9], abs=1e-12)
    assert info["clipped_high"][:, 0].tolist() == [False, True, False, False, False, False]
    assert info["clipped_low"][:, 0].tolist() == [False, False, False, True, False, False]
    assert not info["dual_clipped"].any()
    assert info["ratio"][:, 0].tolist() == pytest.approx(ratios, abs=1e-12)


def test_advantage_scales_loss():
    loss, grad, _ = run([1.1, 1.5, 0.5], [2.0, 2.0, -3.0], eps_low=0.2)
    assert loss == pytest.approx([-2.2, -2.4, 2.4], abs=1e-12)
    assert grad == pytest.approx([-2.2, 0.0, 0.0], abs=1e-12)


def test_clip_higher():
    loss, _, info = run([1.25, 1.5, 0.7], [1.0, 1.0, -1.0], eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx([-1.25, -1.28, 0.8], abs=1e-12)
    assert info["clipped_high"][:, 0].tolist() == [False, True, False]
    assert info["clipped_low"][:, 0].tolist() == [False, False, True]


def test_dual_clip():
    # c = 3: A=-1, r=5: PPO loss 5 -> capped at 3 (no gradient);
    #        A=-2, r=2: loss 4 < c|A| = 6, untouched;  A=+1, r=5: -1.2, dual clip ignores A>0
    loss, grad, info = run([5.0, 2.0, 5.0], [-1.0, -2.0, 1.0], eps_low=0.2, dual_clip=3.0)
    assert loss == pytest.approx([3.0, 4.0, -1.2], abs=1e-12)
    assert grad == pytest.approx([0.0, 4.0, 0.0], abs=1e-12)
    assert info["dual_clipped"][:, 0].tolist() == [True, False, False]
    loss_nodual, _, _ = run([5.0], [-1.0], eps_low=0.2)
    assert loss_nodual == pytest.approx([5.0], abs=1e-12)
    with pytest.raises(ValueError, match="dual_clip"):
        run([1.0], [1.0], dual_clip=1.0)


def test_log_ratio_clamp():
    lp = t([[30.0]]).requires_grad_()
    loss, info = policy_loss(lp, t([[0.0]]), t([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-12)
    loss, info = policy_loss(lp, t([[0.0]]), t([-1.0]), torch.ones(1, 1), log_ratio_clamp=None)
    assert loss.item() == pytest.approx(math.exp(30), rel=1e-12)


def test_tis_token_level_truncation():
    # weights exp(old - rollout) = [0.5, 1.5, 3.0] -> cap 2 -> [0.5, 1.5, 2.0]
    old = t([[0.0, 0.0, 0.0]])
    rollout = t([[math.log(2.0), -math.log(1.5), -math.log(3.0)]])
    mask = torch.ones(1, 3)
    w, trunc = truncated_is_weights(old, rollout, mask, level="token", cap=2.0)
    assert w[0].tolist() == pytest.approx([0.5, 1.5, 2.0], abs=1e-12)
    assert trunc[0].tolist() == [False, False, True]
    # in the loss: A=+1, ratio 1 -> -1 * w
    lp = old.clone().requires_grad_()
    loss, info = policy_loss(lp, old, t([1.0]), mask, rollout_logprobs=rollout, is_level="token", is_cap=2.0)
    assert loss[0].tolist() == pytest.approx([-0.5, -1.5, -2.0], abs=1e-12)
    loss.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([-0.5, -1.5, -2.0], abs=1e-12)
    # no truncation
    w, trunc = truncated_is_weights(old, rollout, mask, cap=None)
    assert w[0].tolist() == pytest.approx([0.5, 1.5, 3.0], abs=1e-12) and not trunc.any()


def test_tis_sequence_level_is_product_over_valid_tokens():
    # seq0: ratios 1.2 * 1.5 = 1.8 (< cap 2); seq1: 2 * 1.5 = 3 -> truncated to 2; padding ignored (NaN)
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rollout = t([[-math.log(1.2), -math.log(1.5), 0.0], [-math.log(2.0), -math.log(1.5), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w, trunc = truncated_is_weights(old, rollout, mask, level="sequence", cap=2.0)
    assert w.tolist() == [pytest.approx([1.8, 1.8, 0.0], abs=1e-12), pytest.approx([2.0, 2.0, 0.0], abs=1e-12)]
    assert trunc.tolist() == [[False, False, False], [True, True, False]]
    lp = old.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, t([-1.0, 1.0]), mask, rollout_logprobs=rollout, is_level="sequence", is_cap=2.0)
    assert loss.tolist() == [pytest.approx([1.8, 1.8, 0.0], abs=1e-12), pytest.approx([-2.0, -2.0, 0.0], abs=1e-12)]


def test_is_weights_are_detached():
    old = t([[0.0, -1.0]]).requires_grad_()
    rollout = t([[0.1, -0.9]]).requires_grad_()
    w, _ = truncated_is_weights(old, rollout, torch.ones(1, 2))
    assert not w.requires_grad


def test_is_argument_errors():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(z, z, z, level="geometric")
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(z, z, z, cap=0.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(z, z, torch.zeros(1), torch.ones(1, 2), is_level="token")


def test_entropy_bonus():
    lp = t([[0.0, 0.0]]).requires_grad_()
    ent = t([[2.0, 1.0]]).requires_grad_()
    loss, _ = policy_loss(lp, t([[0.0, 0.0]]), t([1.0]), torch.ones(1, 2), entropy=ent, entropy_coef=0.1)
    assert loss[0].tolist() == pytest.approx([-1.2, -1.1], abs=1e-12)
    loss.sum().backward()
    assert ent.grad[0].tolist() == pytest.approx([-0.1, -0.1], abs=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, lp.detach(), t([1.0]), torch.ones(1, 2), entropy_coef=0.1)


def test_per_token_advantages_and_shape_errors():
    lp = t([[0.0, 0.0]])
    loss, _ = policy_loss(lp, lp, t([[1.0, -2.0]]), torch.ones(1, 2))
    assert loss[0].tolist() == pytest.approx([-1.0, 2.0], abs=1e-12)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, lp, t([1.0, 2.0]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask"):
        policy_loss(lp, lp, t([1.0]), torch.ones(1, 3))


def test_padding_garbage_gives_zero_loss_and_finite_gradient():
    lp = t([[-1.0, float("nan"), float("inf")]]).requires_grad_()
    old = t([[-1.0, 0.0, float("-inf")]])
    mask = torch.tensor([[True, False, False]])
    loss, info = policy_loss(lp, old, t([-1.0]), mask, dual_clip=3.0)
    assert loss[0].tolist() == [1.0, 0.0, 0.0]
    loss.sum().backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1:].tolist() == [0.0, 0.0]
    assert info["ratio"][0].tolist() == [1.0, 1.0, 1.0]


def test_fp32_and_bf16_inputs():
    lp = torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.ones(2), torch.ones(2, 3))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert lp.grad.dtype == torch.bfloat16
