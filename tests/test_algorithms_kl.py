"""KL estimators k1/k2/k3 (+ veRL aliases) and the per-sequence KL."""
import math

import pytest
import torch

from megatron_grpo.algorithms import KL_KINDS, kl_estimate, sequence_kl

F64 = torch.float64
E = math.e


def t(x):
    return torch.tensor(x, dtype=F64)


# points (logpi, logref): d = logpi - logref = +1, -1, 0
LP = t([-1.0, -2.0, -0.5])
REF = t([-2.0, -1.0, -0.5])


def test_k1_hand_values():
    assert kl_estimate(LP, REF, kind="k1").tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-12)


def test_k2_hand_values():
    assert kl_estimate(LP, REF, kind="k2").tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-12)


def test_k3_hand_values():
    # k3 = exp(ref - pi) - (ref - pi) - 1:  d=+1 -> e^-1 + 1 - 1 = 1/e ; d=-1 -> e - 1 - 1 = e - 2
    assert kl_estimate(LP, REF, kind="k3").tolist() == pytest.approx([1 / E, E - 2, 0.0], abs=1e-12)


def test_abs_hand_values():
    assert kl_estimate(LP, REF, kind="abs").tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("alias,canon", [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")])
def test_verl_aliases(alias, canon):
    assert KL_KINDS[alias] == canon
    assert torch.equal(kl_estimate(LP, REF, kind=alias), kl_estimate(LP, REF, kind=canon))


def test_k3_default_kind_and_nonnegative():
    x = torch.linspace(-5, 5, 101, dtype=F64)
    k3 = kl_estimate(x, torch.zeros_like(x))
    assert torch.equal(k3, kl_estimate(x, torch.zeros_like(x), kind="k3"))
    assert (k3 >= 0).all()


def test_k3_clamp():
    # ref - pi = 30 is clamped to 10: exp(10) - 10 - 1
    out = kl_estimate(t([-30.0]), t([0.0]), kind="k3")
    assert out.item() == pytest.approx(math.exp(10) - 11, rel=1e-12)
    out = kl_estimate(t([-30.0]), t([0.0]), kind="k3", clamp=5.0)
    assert out.item() == pytest.approx(math.exp(5) - 6, rel=1e-12)
    out = kl_estimate(t([-30.0]), t([0.0]), kind="k3", clamp=None)
    assert out.item() == pytest.approx(math.exp(30) - 31, rel=1e-12)
    # float32 without the clamp overflows, with it stays finite
    assert torch.isfinite(kl_estimate(torch.tensor([-200.0]), torch.tensor([0.0]))).all()
    assert not torch.isfinite(kl_estimate(torch.tensor([-200.0]), torch.tensor([0.0]), clamp=None)).all()


def test_k3_gradient():
    # d/dlogpi [exp(ref - pi) - (ref - pi) - 1] = 1 - exp(ref - pi); at pi=-1, ref=-2: 1 - 1/e
    lp = t([-1.0]).requires_grad_()
    kl_estimate(lp, t([-2.0]), kind="k3").sum().backward()
    assert lp.grad.item() == pytest.approx(1 - 1 / E, abs=1e-12)
    # beyond the clamp the gradient is zero
    lp = t([-30.0]).requires_grad_()
    kl_estimate(lp, t([0.0]), kind="k3").sum().backward()
    assert lp.grad.item() == 0.0


def test_k2_gradient():
    lp = t([-1.0]).requires_grad_()
    kl_estimate(lp, t([-2.0]), kind="k2").sum().backward()
    assert lp.grad.item() == pytest.approx(1.0, abs=1e-12)  # d


def test_bf16_is_computed_in_fp32():
    out = kl_estimate(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-2.0], dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_unknown_kind_and_bad_clamp():
    with pytest.raises(ValueError, match="unknown KL kind"):
        kl_estimate(LP, REF, kind="k4")
    with pytest.raises(ValueError, match="clamp"):
        kl_estimate(LP, REF, kind="k3", clamp=0.0)


def test_sequence_kl_masked_sum_and_garbage_padding():
    lp = t([[-1.0, -2.0, float("nan")], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -2.0, float("inf")], [-2.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert sequence_kl(lp, ref, mask).tolist() == pytest.approx([0.5, 1.0 + 2.0], abs=1e-12)
    k3 = sequence_kl(lp, ref, mask, kind="k3")
    # seq0: d=0.5 -> exp(-0.5) + 0.5 - 1 ; d=0 -> 0.  seq1: 1/e + (exp(-2) + 2 - 1)
    assert k3.tolist() == pytest.approx([math.exp(-0.5) - 0.5, 1 / E + math.exp(-2) + 1], abs=1e-12)
    assert not sequence_kl(lp.requires_grad_(), ref, mask).requires_grad
