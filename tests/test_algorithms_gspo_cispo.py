"""GSPO (sequence-level ratio) and CISPO (clipped stop-gradient IS weight): values and gradients by
hand, GSPO against the paper's sequence-level objective written independently, and the on-policy
identity (ratio 1: every kind is the same policy gradient). Exactness under micro-batching and DP is
in test_algorithms_aggregation.py (parametrised over POLICY_LOSSES)."""
import math

import pytest
import torch

from megatron_grpo.algorithms import POLICY_LOSSES, grpo_loss, loss_normalizer, policy_loss

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------- GSPO
# Four sequences (old logprob 0, so logprob = log-ratio); padding holds garbage.
NAN = float("nan")
GSPO_LR = [[0.1, 0.3, NAN], [0.6, 0.0, 0.3], [-0.5, -0.3, NAN], [0.2, -0.2, 0.3]]
GSPO_MASK = [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
GSPO_ADV = [1.0, 1.0, -1.0, -2.0]


def test_gspo_hand_values_and_gradients():
    lp = t(GSPO_LR).requires_grad_()
    mask = torch.tensor(GSPO_MASK)
    loss, info = policy_loss(lp, torch.zeros_like(lp), t(GSPO_ADV), mask, eps_low=0.3, eps_high=0.3, kind="gspo")
    loss.sum().backward()
    s = [math.exp(0.2), math.exp(0.3), math.exp(-0.4), math.exp(0.1)]  # exp(mean log-ratio) per sequence
    # row 0: s=1.221 in [0.7, 1.3], A=+1: -s.   row 1: s=1.350 > 1.3, A=+1: clipped, -1.3, no gradient.
    # row 2: s=0.670 < 0.7, A=-1: clipped, +0.7, no gradient.   row 3: s=1.105, A=-2: +2s, grad 2s.
    expected = [[-s[0], -s[0], 0.0], [-1.3] * 3, [0.7, 0.7, 0.0], [2 * s[3]] * 3]
    grad = [[-s[0], -s[0], 0.0], [0.0] * 3, [0.0] * 3, [2 * s[3]] * 3]  # d loss_t / d logprob_t = -A s
    assert loss.tolist() == [pytest.approx(r, abs=1e-12) for r in expected]
    assert lp.grad.tolist() == [pytest.approx(r, abs=1e-12) for r in grad]
    ratio = info["ratio"]
    for i in range(4):  # every valid token carries its sequence's ratio
        assert ratio[i][mask[i].bool()].tolist() == pytest.approx([s[i]] * int(mask[i].sum()), abs=1e-12)
    assert info["clipped_high"].tolist() == [[False] * 3, [True] * 3, [False] * 3, [False] * 3]
    assert info["clipped_low"].tolist() == [[False] * 3, [False] * 3, [True, True, False], [False] * 3]
    # the token-level (PPO) loss of the same inputs differs: the ratio really is per sequence
    ppo, _ = policy_loss(lp.detach(), torch.zeros_like(lp), t(GSPO_ADV), mask, eps_low=0.3)
    assert ppo[0, 0].item() == pytest.approx(-math.exp(0.1), abs=1e-12)


def test_gspo_paper_default_clip_is_per_sequence():
    # eps 3e-4 / 4e-4 (GSPO paper): a sequence whose mean log-ratio is 5e-4 is clipped at 1+4e-4 on
    # every token, even though its first token's own ratio (exp(-1e-3)) would be inside any PPO range.
    lp = t([[-1e-3, 2e-3], [1e-4, 1e-4]]).requires_grad_()
    loss, info = policy_loss(lp, torch.zeros_like(lp), t([1.0, 1.0]), torch.ones(2, 2), eps_low=3e-4,
                             eps_high=4e-4, kind="gspo")
    loss.sum().backward()
    assert loss[0].tolist() == pytest.approx([-(1 + 4e-4)] * 2, abs=1e-15)
    assert lp.grad[0].tolist() == [0.0, 0.0]
    assert loss[1].tolist() == pytest.approx([-math.exp(1e-4)] * 2, abs=1e-15)
    assert lp.grad[1].tolist() == pytest.approx([-math.exp(1e-4)] * 2, abs=1e-15)
    assert info["clipped_high"].tolist() == [[True, True], [False, False]]


def gspo_sequence_objective(lp, old, adv, mask, eps_low, eps_high):
    """GSPO paper eq. (5), written independently: J = mean_i min(s_i A_i, clip(s_i) A_i) with the
    differentiable s_i = exp(mean_t(lp - old)); the loss is -J. Its gradient equals GSPO-token's
    with seq-mean-token-mean aggregation when A is per sequence (the paper's section 4.3)."""
    terms = []
    for i in range(lp.shape[0]):
        idx = [j for j in range(lp.shape[1]) if mask[i, j]]
        if not idx:
            continue
        s = torch.exp(sum(lp[i, j] - old[i, j] for j in idx) / len(idx))
        terms.append(torch.minimum(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i]))
    return -sum(terms) / len(terms)


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.28)])
@pytest.mark.parametrize("seed", range(5))
def test_gspo_token_matches_the_sequence_objective(eps, seed):
    g = torch.Generator().manual_seed(seed)
    b, tl = 6, 5
    mask = torch.rand(b, tl, generator=g) < 0.7
    mask[:, 0] = True
    mask[-1] = False  # an empty row counts for nothing
    lp = (-torch.rand(b, tl, generator=g, dtype=F64) * 3).requires_grad_()
    scale = 4 * eps[1]  # some sequences inside the clip range, some outside
    old = lp.detach() + scale * torch.randn(b, tl, generator=g, dtype=F64)
    lp_bad = lp.masked_fill(~mask, float("inf"))  # padding garbage must not leak
    adv = torch.randn(b, generator=g, dtype=F64)
    ours, _ = grpo_loss(lp_bad, old, adv, mask, normalizer=loss_normalizer(mask, "seq-mean-token-mean"),
                        agg_mode="seq-mean-token-mean", eps_low=eps[0], eps_high=eps[1], policy_loss_kind="gspo")
    g_ours, = torch.autograd.grad(ours, lp)
    ref = gspo_sequence_objective(lp, old, adv, mask, *eps)
    g_ref, = torch.autograd.grad(ref, lp)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(g_ours, g_ref, atol=1e-12, rtol=0)
    assert g_ref.abs().sum() > 0


# ---------------------------------------------------------------- CISPO
def cispo_run(ratios, advs, **kw):
    lp = t([[math.log(r)] for r in ratios]).requires_grad_()
    loss, info = policy_loss(lp, torch.zeros_like(lp), t(advs), torch.ones_like(lp), kind="cispo", **kw)
    loss.sum().backward()
    return loss[:, 0].tolist(), lp.grad[:, 0].tolist(), info


def test_cispo_hand_values_and_gradients_no_lower_bound():
    # eps_low=None (MiniMax-M1: no lower bound), eps_high=4: weight = min(r, 5), stop-gradient
    ratios, advs = [0.5, 1.0, 3.0, 7.0], [1.0, -1.0, 2.0, -1.0]
    loss, grad, info = cispo_run(ratios, advs, eps_low=None, eps_high=4.0)
    w = [0.5, 1.0, 3.0, 5.0]
    # loss_t = -w A logprob_t; its gradient is -w A (the weight is a constant): no token loses its gradient
    assert loss == pytest.approx([-w[i] * advs[i] * math.log(ratios[i]) for i in range(4)], abs=1e-12)
    assert loss == pytest.approx([0.5 * math.log(2), 0.0, -6 * math.log(3), 5 * math.log(7)], abs=1e-12)
    assert grad == pytest.approx([-0.5, 1.0, -6.0, 5.0], abs=1e-12)
    assert info["clipped_high"][:, 0].tolist() == [False, False, False, True]
    assert not info["clipped_low"].any()
    assert info["ratio"][:, 0].tolist() == pytest.approx(ratios, abs=1e-12)


def test_cispo_lower_bound_and_contrast_with_ppo_clip():
    # eps_low=0.2, eps_high=0.28: weights clip(r, 0.8, 1.28)
    ratios, advs = [0.5, 1.1, 2.0], [1.0, 1.0, 1.0]
    loss, grad, info = cispo_run(ratios, advs, eps_low=0.2, eps_high=0.28)
    assert grad == pytest.approx([-0.8, -1.1, -1.28], abs=1e-12)
    assert loss == pytest.approx([0.8 * math.log(2), -1.1 * math.log(1.1), -1.28 * math.log(2)], abs=1e-12)
    assert info["clipped_low"][:, 0].tolist() == [True, False, False]
    assert info["clipped_high"][:, 0].tolist() == [False, False, True]
    # PPO clip drops the gradient of the r=2 token (A>0, r>1.28); CISPO keeps it with weight 1.28
    lp = t([[math.log(2.0)]]).requires_grad_()
    ppo, _ = policy_loss(lp, torch.zeros_like(lp), t([1.0]), torch.ones(1, 1), eps_low=0.2, eps_high=0.28)
    ppo.sum().backward()
    assert lp.grad.item() == 0.0


def test_cispo_errors():
    lp, m = t([[0.0]]), torch.ones(1, 1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, lp, t([1.0]), m, kind="cispo", eps_low=None, eps_high=4.0, dual_clip=3.0)
    with pytest.raises(ValueError, match="eps_high"):
        policy_loss(lp, lp, t([1.0]), m, kind="cispo", eps_low=None, eps_high=None)
    with pytest.raises(ValueError, match="kind"):
        policy_loss(lp, lp, t([1.0]), m, kind="sapo")
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(lp, lp, t([1.0]), m, kind="gspo", eps_low=None, eps_high=4e-4)


# ---------------------------------------------------------------- all kinds
def test_on_policy_every_kind_is_the_same_policy_gradient():
    """old = logprobs (ratio 1): ppo_clip, gspo and cispo all give grad = -A / N per valid token."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    lp0 = -torch.rand(3, 4, generator=g, dtype=F64)
    adv = t([0.7, -1.3, 0.4])
    grads = {}
    for kind in POLICY_LOSSES:
        lp = lp0.clone().requires_grad_()
        kw = dict(eps_low=None, eps_high=4.0) if kind == "cispo" else dict(eps_low=3e-4, eps_high=4e-4)
        loss, met = grpo_loss(lp, None, adv, mask, normalizer=loss_normalizer(mask), policy_loss_kind=kind, **kw)
        grads[kind], = torch.autograd.grad(loss, lp)
        assert met["clip_frac_low_sum"].item() == 0 and met["clip_frac_high_sum"].item() == 0
    expected = torch.where(mask.bool(), -adv[:, None] / 8, torch.zeros((), dtype=F64)).expand(3, 4)
    for kind in POLICY_LOSSES:
        assert torch.allclose(grads[kind], expected, atol=1e-14, rtol=0), kind
