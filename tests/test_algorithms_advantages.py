"""Group advantages and KL-in-reward: hand-computed values and hypothesis properties."""
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_grpo.algorithms import group_advantages, kl_in_reward

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------- hand-computed values
# Group A = [1, 0, 0, 0]: mean 0.25, centered [0.75, -0.25, -0.25, -0.25],
# unbiased var = (0.5625 + 3*0.0625) / 3 = 0.25 -> std 0.5.
# Group B = [2, 2, 2, 2]: constant -> 0.

def test_group_scale_hand_values():
    adv = group_advantages(t([1, 0, 0, 0, 2, 2, 2, 2]), 4, eps=0.0)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], abs=1e-12)


def test_group_scale_default_eps_is_added_to_std():
    adv = group_advantages(t([1, 0, 0, 0]), 4)  # eps = 1e-6
    assert adv.tolist() == pytest.approx([0.75 / 0.500001] + [-0.25 / 0.500001] * 3, abs=1e-12)


def test_group_scale_g3():
    # [0, 1, 2]: mean 1, unbiased std sqrt((1 + 0 + 1) / 2) = 1.
    assert group_advantages(t([0, 1, 2]), 3, eps=0.0).tolist() == pytest.approx([-1, 0, 1], abs=1e-12)


def test_batch_scale_hand_values():
    # groups [0, 2] and [1, 1]; batch std (unbiased) = sqrt((1 + 1 + 0 + 0) / 3) = sqrt(2/3)
    adv = group_advantages(t([0, 2, 1, 1]), 2, scale="batch", eps=0.0)
    assert adv.tolist() == pytest.approx([-math.sqrt(1.5), math.sqrt(1.5), 0, 0], abs=1e-12)


def test_no_scale_is_dr_grpo_centering():
    adv = group_advantages(t([1, 0, 0, 0, 3, 1, 1, 3]), 4, scale="none")
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 1, -1, -1, 1], abs=1e-12)


def test_leave_one_out_hand_values():
    # baselines: r0 -> mean(0,0,0) = 0; r1..r3 -> mean(1,0,0) = 1/3
    adv = group_advantages(t([1, 0, 0, 0]), 4, scale="none", leave_one_out=True)
    assert adv.tolist() == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3], abs=1e-12)
    # scale="group" divides by the (unbiased) std of the whole group, 0.5
    adv = group_advantages(t([1, 0, 0, 0]), 4, scale="group", leave_one_out=True, eps=0.0)
    assert adv.tolist() == pytest.approx([2, -2 / 3, -2 / 3, -2 / 3], abs=1e-12)


def test_float32_input_keeps_float32_and_device():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = group_advantages(r, 2)
    assert adv.dtype == torch.float32 and adv.device == r.device
    # bf16 rewards are computed in fp32
    assert group_advantages(r.bfloat16(), 2).dtype == torch.float32


def test_constant_group_of_inexact_floats_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in binary floating point: the centering alone would leave ~1e-17.
    for g in range(2, 17):
        r = torch.full((2 * g,), 0.1, dtype=F64)
        for scale in ("group", "batch", "none"):
            for loo in (False, True):
                adv = group_advantages(r, g, scale=scale, leave_one_out=loo, eps=0.0)
                assert torch.equal(adv, torch.zeros_like(adv)), (g, scale, loo)


@pytest.mark.parametrize(
    "n,g,match",
    [(7, 4, "multiple"), (8, 1, ">= 2"), (8, 0, ">= 2"), (0, 2, "multiple")],
)
def test_bad_shapes_raise(n, g, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(n), g)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="int"):
        group_advantages(torch.zeros(4), 2.0)


def test_kl_in_reward_hand_values():
    out = kl_in_reward(t([1.0, 0.0]), t([2.0, -1.0]), 0.1)
    assert out.tolist() == pytest.approx([0.8, 0.1], abs=1e-12)
    seq_kl = torch.tensor([1.0, 1.0], requires_grad=True)
    assert not kl_in_reward(torch.zeros(2), seq_kl, 0.5).requires_grad
    with pytest.raises(ValueError, match="shape"):
        kl_in_reward(torch.zeros(2), torch.zeros(3), 0.1)


# ---------------------------------------------------------------- properties
# Rewards on a quarter grid (realistic rewards are a few discrete values) so that
# shifting by a multiple of 0.5 is exact in float64.
_reward = st.integers(-40, 40).map(lambda k: k / 4)


@st.composite
def grouped_rewards(draw, min_g=2, max_g=8, max_groups=5):
    g = draw(st.integers(min_g, max_g))
    n = draw(st.integers(1, max_groups))
    vals = draw(st.lists(_reward, min_size=n * g, max_size=n * g))
    return t(vals), g


@settings(max_examples=60, deadline=None)
@given(grouped_rewards(), st.lists(st.integers(-200, 200), min_size=5, max_size=5),
       st.sampled_from(["group", "batch", "none"]), st.booleans())
def test_shift_invariance_per_group(rg, shifts, scale, loo):
    r, g = rg
    n = r.numel() // g
    shift = t([s / 2 for s in shifts[:n]]).repeat_interleave(g)
    if scale == "batch":  # batch std changes with per-group shifts; shift all groups equally
        shift = torch.full_like(r, shifts[0] / 2)
    a = group_advantages(r, g, scale=scale, leave_one_out=loo, eps=1e-6)
    b = group_advantages(r + shift, g, scale=scale, leave_one_out=loo, eps=1e-6)
    assert torch.allclose(a, b, atol=1e-9, rtol=0)


@settings(max_examples=60, deadline=None)
@given(grouped_rewards(), st.floats(0.01, 100.0), st.sampled_from(["group", "batch"]), st.booleans())
def test_positive_scale_invariance(rg, k, scale, loo):
    r, g = rg
    a = group_advantages(r, g, scale=scale, leave_one_out=loo, eps=0.0)
    b = group_advantages(r * k, g, scale=scale, leave_one_out=loo, eps=0.0)
    assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(grouped_rewards(), st.floats(0.01, 100.0))
def test_no_scale_is_linear_in_scale(rg, k):
    r, g = rg
    a = group_advantages(r, g, scale="none")
    b = group_advantages(r * k, g, scale="none")
    assert torch.allclose(a * k, b, atol=1e-9, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 16), st.integers(1, 4),
       st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
       st.sampled_from(["group", "batch", "none"]), st.booleans(), st.sampled_from([0.0, 1e-6, 1e-4]))
def test_zero_variance_groups_are_zero_never_nan(g, n, value, scale, loo, eps):
    r = torch.full((n * g,), value, dtype=F64)
    adv = group_advantages(r, g, scale=scale, leave_one_out=loo, eps=eps)
    assert torch.equal(adv, torch.zeros_like(adv))


@settings(max_examples=60, deadline=None)
@given(grouped_rewards())
def test_mixed_constant_and_varied_groups(rg):
    r, g = rg
    r = torch.cat([torch.full((g,), 0.1, dtype=F64), r])  # prepend a constant group
    for scale in ("group", "batch", "none"):
        adv = group_advantages(r, g, scale=scale, eps=0.0)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[:g], torch.zeros(g, dtype=F64))


@settings(max_examples=60, deadline=None)
@given(grouped_rewards(), st.booleans())
def test_matches_naive_reference(rg, loo):
    """Independent reference: python loops + statistics.stdev (unbiased)."""
    r, g = rg
    vals = r.tolist()
    expected_none, expected_group = [], []
    for k in range(0, len(vals), g):
        grp = vals[k:k + g]
        for i, x in enumerate(grp):
            if loo:
                base = (sum(grp) - x) / (g - 1)
            else:
                base = sum(grp) / g
            c = 0.0 if len(set(grp)) == 1 else x - base
            expected_none.append(c)
            sd = statistics.stdev(grp)
            expected_group.append(0.0 if c == 0.0 else c / (sd + 1e-6))
    got_none = group_advantages(r, g, scale="none", leave_one_out=loo)
    got_group = group_advantages(r, g, scale="group", leave_one_out=loo)
    assert got_none.tolist() == pytest.approx(expected_none, abs=1e-9)
    assert got_group.tolist() == pytest.approx(expected_group, abs=1e-9)
    if not loo:  # centered advantages sum to 0 within each group
        sums = got_none.view(-1, g).sum(dim=1)
        assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-9)
