"""grpo_loss metrics: hand values, and exact combination across micro-batches / DP ranks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_grpo.algorithms import (
    advantage_metrics,
    combine_metrics,
    finalize_metrics,
    grpo_loss,
    loss_normalizer,
    masked_stats,
    metric_reduce_op,
    pack_metrics,
    unpack_metrics,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_reduce_op_by_suffix():
    assert [metric_reduce_op(k) for k in ("a_sum", "a_sqsum", "a_count", "a_min", "a_max")] == [
        "sum", "sum", "sum", "min", "max"]
    with pytest.raises(ValueError, match="suffix"):
        metric_reduce_op("ratio_mean")


def test_finalize_hand_values():
    m = {"x_sum": t(6.0), "x_sqsum": t(14.0), "x_count": t(3.0), "x_min": t(1.0), "x_max": t(3.0),
         "loss_sum": t(0.5), "empty_sum": t(0.0), "empty_count": t(0.0), "none_min": t(math.inf)}
    # values 1, 2, 3: mean 2, population std sqrt(14/3 - 4) = sqrt(2/3)
    assert finalize_metrics(m) == pytest.approx(
        {"x": 2.0, "x_std": math.sqrt(2 / 3), "x_min": 1.0, "x_max": 3.0, "loss": 0.5})


def test_combine_and_pack_roundtrip():
    a = {"x_sum": t(1.0), "x_count": t(1.0), "x_min": t(1.0), "x_max": t(1.0)}
    b = {"x_sum": t(5.0), "x_count": t(2.0), "x_min": t(2.0), "x_max": t(3.0)}
    c = combine_metrics(a, b)
    assert {k: v.item() for k, v in c.items()} == {"x_sum": 6.0, "x_count": 3.0, "x_min": 1.0, "x_max": 3.0}
    assert {k: v.item() for k, v in combine_metrics([a, b]).items()} == {k: v.item() for k, v in c.items()}
    packed = pack_metrics(c)
    assert packed["sum"][0] == ["x_count", "x_sum"] and packed["min"][0] == ["x_min"]
    assert {k: v.item() for k, v in unpack_metrics(packed).items()} == {k: v.item() for k, v in c.items()}


def test_masked_stats_and_advantage_metrics_hand_values():
    s = masked_stats("f", torch.tensor([[True, False, True], [True, True, False]]),
                     torch.tensor([[1, 1, 0], [1, 1, 1]]), moments=False)
    assert finalize_metrics(s) == pytest.approx({"f": 3 / 5})
    # sequences 0 and 2 have valid tokens; sequence 1 is padding only
    adv = t([1.0, 100.0, -3.0])
    mask = torch.tensor([[1, 0], [0, 0], [1, 1]])
    out = finalize_metrics(advantage_metrics(adv, mask))
    assert out == pytest.approx({"advantage": -1.0, "advantage_std": 2.0, "advantage_min": -3.0,
                                 "advantage_max": 1.0})


def test_grpo_loss_metrics_hand_values():
    # 2 sequences x 3 tokens, old logprob 0 so ratio = exp(logprob)
    ratios = [[1.5, 0.5, 1.0], [0.5, 5.0, 1.1]]
    lp = t([[math.log(r) for r in row] for row in ratios]).requires_grad_()
    old = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # 5 valid tokens; (0, 2) is padding
    adv = t([1.0, -1.0])
    ref = t([[0.0, math.log(0.5) - 1.0, 0.0], [math.log(0.5), math.log(5.0), math.log(1.1)]])  # logpi - ref: [log 1.5, 1, 0, 0, 0]
    roll = t([[0.0, -0.1, 9.0], [0.2, 0.0, math.log(4.0)]])  # |old - roll| valid: 0, .1, .2, 0, log 4
    ent = t([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    loss, met = grpo_loss(lp, old, adv, mask, normalizer=5, ref_logprobs=ref, rollout_logprobs=roll,
                          entropy=ent, eps_low=0.2, dual_clip=3.0, kl_coef=0.0, kl_kind="k1",
                          is_level="token", is_cap=2.0)
    f = finalize_metrics(met)
    # clipping: seq0 A>0: r=1.5 high-clipped; r=0.5 unclipped.  seq1 A<0: r=0.5 low-clipped,
    # r=5 dual-clipped (c=3), r=1.1 inside.
    assert f["clip_frac_high"] == pytest.approx(1 / 5)
    assert f["clip_frac_low"] == pytest.approx(1 / 5)
    assert f["dual_clip_frac"] == pytest.approx(1 / 5)
    assert f["ratio"] == pytest.approx((1.5 + 0.5 + 0.5 + 5.0 + 1.1) / 5)
    assert (f["ratio_min"], f["ratio_max"]) == pytest.approx((0.5, 5.0))
    k3_old = [r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 5.0, 1.1)]
    assert f["approx_kl_old"] == pytest.approx(sum(k3_old) / 5)
    # k1 to reference: logpi - ref = [log1.5, 1.0, 0, 0, 0]
    assert f["kl_ref"] == pytest.approx((math.log(1.5) + 1.0) / 5)
    assert f["rollout_logprob_abs_diff"] == pytest.approx((0.1 + 0.2 + math.log(4.0)) / 5)
    assert f["rollout_logprob_abs_diff_max"] == pytest.approx(math.log(4.0))
    assert f["token_mult_prob_error"] == pytest.approx((1 + math.exp(0.1) + math.exp(0.2) + 1 + 4.0) / 5)
    # IS weights exp(old - roll) = [1, e^.1, e^-.2, 1, 1/4]; none above 2
    w = [1, math.exp(0.1), math.exp(-0.2), 1, 0.25]
    assert f["is_weight"] == pytest.approx(sum(w) / 5)
    assert (f["is_weight_min"], f["is_weight_max"]) == pytest.approx((0.25, math.exp(0.1)))
    assert f["is_trunc_frac"] == 0.0
    assert f["entropy"] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert (f["advantage"], f["advantage_min"], f["advantage_max"]) == pytest.approx((0.0, -1.0, 1.0))
    assert f["advantage_std"] == pytest.approx(1.0)
    assert (f["num_tokens"], f["num_seqs"]) == (5.0, 2.0)
    # per-token pg = -min(rA, clip(r)A) [dual clip] * IS weight; kl_coef = 0 so loss = pg
    pg = [-1.2 * 1, -0.5 * math.exp(0.1), 0.8 * math.exp(-0.2), 3.0 * 1, 1.1 * 0.25]
    assert loss.item() == pytest.approx(sum(pg) / 5)
    assert f["loss"] == pytest.approx(sum(pg) / 5) and f["pg_loss"] == pytest.approx(sum(pg) / 5)
    assert f["kl_loss"] == pytest.approx((math.log(1.5) + 1.0) / 5)


def test_kl_term_in_loss_hand_value():
    lp = t([[-1.0, -2.0]]).requires_grad_()
    ref = t([[-2.0, -1.0]])
    loss, met = grpo_loss(lp, None, t([0.0]), torch.ones(1, 2), normalizer=2, ref_logprobs=ref,
                          kl_coef=0.1, kl_kind="k3")
    # A = 0 -> pg 0; k3 = [1/e, e - 2]
    assert loss.item() == pytest.approx(0.1 * (1 / math.e + math.e - 2) / 2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, None, t([0.0]), torch.ones(1, 2), normalizer=2, kl_coef=0.1)


def test_key_set_is_data_independent_and_empty_shards_are_safe():
    kw = dict(ref_logprobs=torch.zeros(2, 3), rollout_logprobs=torch.zeros(2, 3), entropy=torch.zeros(2, 3),
              is_level="sequence", dual_clip=3.0)
    _, full = grpo_loss(torch.zeros(2, 3), None, torch.ones(2), torch.ones(2, 3), normalizer=6, **kw)
    _, empty = grpo_loss(torch.zeros(2, 3), None, torch.ones(2), torch.zeros(2, 3), normalizer=6, **kw)
    assert set(full) == set(empty)
    assert all(torch.isfinite(v) for k, v in empty.items() if not k.endswith(("_min", "_max")))
    # combining with an empty shard changes nothing
    a = finalize_metrics(full)
    assert finalize_metrics(combine_metrics(full, empty)) == pytest.approx(a)
    assert finalize_metrics(empty).get("ratio_min") is None  # no samples -> omitted, not inf/NaN


@st.composite
def split_batch(draw):
    b = draw(st.integers(1, 7))
    t_ = draw(st.integers(1, 5))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t_, max_size=t_), min_size=b, max_size=b)))
    seed = draw(st.integers(0, 2**31 - 1))
    cuts = sorted(draw(st.lists(st.integers(0, b), max_size=4)))
    dp = draw(st.integers(1, 3))
    return mask, seed, [0] + cuts + [b], dp


@settings(max_examples=40, deadline=None)
@given(split_batch(), st.sampled_from([None, "token", "sequence"]))
def test_metrics_combine_exactly(batch, is_level):
    mask, seed, bounds, dp = batch
    g = torch.Generator().manual_seed(seed)
    b, tt = mask.shape
    lp = -torch.rand(b, tt, generator=g, dtype=F64) * 2
    old = lp + 0.5 * torch.randn(b, tt, generator=g, dtype=F64)
    ref = lp + 0.5 * torch.randn(b, tt, generator=g, dtype=F64)
    roll = old + 0.5 * torch.randn(b, tt, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    ent = torch.rand(b, tt, generator=g, dtype=F64)
    kw = dict(ref_logprobs=ref, rollout_logprobs=roll, entropy=ent, is_level=is_level, is_cap=1.5,
              dual_clip=2.0, kl_coef=0.1)
    n = loss_normalizer(mask)
    _, full = grpo_loss(lp, old, adv, mask, normalizer=n, **kw)
    parts = []
    for a, c in zip(bounds, bounds[1:]):
        s = slice(a, c)
        parts.append(grpo_loss(lp[s], old[s], adv[s], mask[s], normalizer=n,
                               **{k: (v[s] if torch.is_tensor(v) else v) for k, v in kw.items()})[1])
    # micro-batches are dealt round-robin to `dp` ranks; each rank combines locally,
    # then the ranks are reduced through pack -> elementwise op -> unpack (an all_reduce).
    ranks = [combine_metrics(parts[r::dp]) if parts[r::dp] else None for r in range(dp)]
    ranks = [r for r in ranks if r is not None]
    packs = [pack_metrics(r) for r in ranks]
    reduced = {}
    for op in packs[0]:
        keys, tens = packs[0][op]
        stacked = torch.stack([p[op][1] for p in packs])
        assert all(p[op][0] == keys for p in packs)
        red = {"sum": stacked.sum(0), "min": stacked.amin(0), "max": stacked.amax(0)}[op]
        reduced[op] = (keys, red)
    got = finalize_metrics(unpack_metrics(reduced))
    want = finalize_metrics(full)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-9), k
