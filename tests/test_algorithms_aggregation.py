"""Loss aggregation: hand values, and exactness of loss AND gradients under
micro-batching + data-parallel sharding (hypothesis, float64)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_grpo.algorithms import AGG_MODES, POLICY_LOSSES, aggregate, grpo_loss, loss_normalizer

F64 = torch.float64

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # third row: all padding


@pytest.mark.parametrize(
    "mode,norm,value",
    [
        ("token-mean", 3, (1 + 2 + 4) / 3),
        ("seq-mean-token-mean", 2, ((1 + 2) / 2 + 4 / 1) / 2),
        ("seq-mean-token-sum", 2, (3 + 4) / 2),
        ("seq-mean-token-sum-norm", 2 * 4, 7 / (2 * 4)),
    ],
)
def test_hand_values(mode, norm, value):
    n = loss_normalizer(MASK, mode, max_len=4)
    assert n.dtype == torch.int64 and n.item() == norm
    assert aggregate(LOSS, MASK, mode, n).item() == pytest.approx(value, abs=1e-12)


def test_micro_batches_with_global_normalizer_hand_values():
    # token-mean, rows split into two micro-batches; global normaliser 3.
    a = aggregate(LOSS[:1], MASK[:1], "token-mean", 3)  # (1 + 2) / 3
    b = aggregate(LOSS[1:], MASK[1:], "token-mean", 3)  # 4 / 3
    assert (a.item(), b.item()) == pytest.approx((1.0, 4 / 3), abs=1e-12)
    assert (a + b).item() == pytest.approx(7 / 3, abs=1e-12)
    # the classic bug (local normaliser) would give (3/2 + 4/1) = 5.5, not 7/3
    local = aggregate(LOSS[:1], MASK[:1], "token-mean", loss_normalizer(MASK[:1])) + aggregate(
        LOSS[1:], MASK[1:], "token-mean", loss_normalizer(MASK[1:]))
    assert local.item() == pytest.approx(5.5, abs=1e-12)


def test_zero_normalizer_gives_zero_not_nan():
    z = torch.zeros(2, 3)
    for mode in AGG_MODES:
        n = loss_normalizer(z, mode, max_len=3)
        assert n.item() == 0
        out = aggregate(LOSS[:2], z, mode, n)
        assert out.item() == 0.0


def test_padding_garbage_does_not_leak():
    loss = LOSS.clone()
    loss[0, 2] = float("nan")
    loss[2, :] = float("inf")
    for mode in AGG_MODES:
        assert torch.isfinite(aggregate(loss, MASK, mode, loss_normalizer(MASK, mode, max_len=4)))


def test_errors():
    with pytest.raises(ValueError, match="aggregation mode"):
        loss_normalizer(MASK, "seq-sum")
    with pytest.raises(ValueError, match="max_len"):
        loss_normalizer(MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(LOSS, MASK, "mean", 3)
    with pytest.raises(ValueError, match="mask"):
        aggregate(LOSS, MASK[:2], "token-mean", 3)


# ---------------------------------------------------------------- exactness properties
def reference(per_token, mask, mode, max_len):
    """Full-batch definition, written independently of the code under test."""
    rows = []
    for i in range(per_token.shape[0]):
        vals = [per_token[i, j] for j in range(per_token.shape[1]) if mask[i, j]]
        if vals:
            rows.append(vals)
    n_tok = sum(len(r) for r in rows)
    if not rows:
        return per_token.sum() * 0
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / n_tok
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_len)


@st.composite
def batches(draw):
    b = draw(st.integers(1, 8))
    t = draw(st.integers(1, 6))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    seed = draw(st.integers(0, 2**31 - 1))
    perm = draw(st.permutations(list(range(b))))
    dp = draw(st.integers(1, 3))
    # assign each (permuted) row to a DP rank, and cut each rank's rows into micro-batches
    ranks = [draw(st.integers(0, dp - 1)) for _ in range(b)]
    shards = []
    for r in range(dp):
        rows = [perm[i] for i in range(b) if ranks[i] == r]
        cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=3)))
        bounds = [0] + cuts + [len(rows)]
        shards.append([rows[a:c] for a, c in zip(bounds, bounds[1:])])
    return mask, seed, shards


def _inputs(mask, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = mask.shape
    lp = (-torch.rand(b, t, generator=g, dtype=F64) * 3).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = lp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    roll = old + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    ent = torch.rand(b, t, generator=g, dtype=F64)
    return lp, old, ref, roll, adv, ent


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(AGG_MODES))
def test_aggregate_sum_over_microbatches_and_ranks_is_exact(batch, mode):
    mask, seed, shards = batch
    per_token = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    per_token.requires_grad_()
    max_len = 7
    idx_all = [rows for rank in shards for rows in rank]
    n = sum(loss_normalizer(mask[rows], mode, max_len=max_len) for rows in idx_all)
    total = sum(aggregate(per_token[rows], mask[rows], mode, n) for rows in idx_all)
    expected = reference(per_token, mask, mode, max_len)
    g_total, = torch.autograd.grad(total, per_token)
    g_exp, = torch.autograd.grad(expected, per_token, allow_unused=True) if expected.requires_grad else (None,)
    g_exp = torch.zeros_like(per_token) if g_exp is None else g_exp
    assert total.item() == pytest.approx(expected.item(), abs=1e-10)
    assert torch.allclose(g_total, g_exp, atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(AGG_MODES), st.sampled_from([None, "token", "sequence"]),
       st.sampled_from(POLICY_LOSSES))
def test_grpo_loss_and_grad_exact_under_sharding(batch, mode, is_level, kind):
    """Full GRPO loss (clip / GSPO / CISPO, dual clip, KL, IS, entropy): the sum over DP ranks of the
    sum over micro-batches equals the full-batch loss, and so do the gradients."""
    mask, seed, shards = batch
    lp, old, ref, roll, adv, ent = _inputs(mask, seed)
    kw = dict(agg_mode=mode, eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_kind="k3",
              is_level=is_level, is_cap=1.5, entropy_coef=0.01, policy_loss_kind=kind)
    if kind == "cispo":
        kw.update(eps_low=None, eps_high=4.0, dual_clip=None)
    max_len = 7

    def call(rows, normalizer):
        sel = lambda x: x[rows]  # noqa: E731
        loss, _ = grpo_loss(sel(lp), sel(old), sel(adv), sel(mask), normalizer=normalizer,
                            ref_logprobs=sel(ref), rollout_logprobs=sel(roll), entropy=sel(ent), **kw)
        return loss

    all_rows = list(range(mask.shape[0]))
    full = call(all_rows, loss_normalizer(mask, mode, max_len=max_len))
    g_full, = torch.autograd.grad(full, lp)

    idx_all = [rows for rank in shards for rows in rank]
    n = sum(loss_normalizer(mask[rows], mode, max_len=max_len) for rows in idx_all)  # "all_reduce"
    rank_grads = []
    rank_losses = []
    for rank in shards:  # each DP rank accumulates its micro-batches, then gradients are SUMMED
        loss_r = sum((call(rows, n) for rows in rank), torch.zeros((), dtype=F64))
        rank_losses.append(loss_r)
        if loss_r.requires_grad:
            rank_grads.append(torch.autograd.grad(loss_r, lp)[0])
    total = sum(rank_losses)
    g_total = sum(rank_grads, torch.zeros_like(lp))
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(g_total, g_full, atol=1e-6, rtol=0)
    assert torch.isfinite(g_total).all()


def test_sharding_property_catches_local_normalizer():
    """Sanity check of the harness: a local normaliser would NOT match (so the test can fail)."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]], dtype=F64)
    full = reference(per_token, mask, "token-mean", None)
    local = sum(aggregate(per_token[[i]], mask[[i]], "token-mean", loss_normalizer(mask[[i]])) for i in range(2))
    assert abs(local.item() - full.item()) > 0.5
