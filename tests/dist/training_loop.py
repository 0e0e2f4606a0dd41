"""Rank body (2 ranks): training over steps, the non-finite guard, the reference policy, the LR
schedule, and the distributed optimizer.

Phase A, TP1 x PP2: reference (swap and copy) at step 0 equals the policy; 20 GRPO steps on a
fixed batch with fixed advantages and fixed old logprobs lower the loss; the LR follows warmup +
cosine; a NaN loss skips the update (weights bit-identical, counter +1, LR not advanced) and the
next step trains again; swap restores the policy weights bit-exactly and swap == copy.
Phase B, TP1 x PP1 x DP2: the distributed optimizer gives the same weights as the plain one.
"""
from __future__ import annotations

import math

import torch

from tests.dist import training_helpers as H


def _params(chunks):
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def phase_a(report: dict, model_dir: str) -> None:
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.models.reference import ReferencePolicy, build_reference
    from megatron_grpo.training import (GRPOTrainStep, build_lr_scheduler, build_optimizer,
                                        wrap_model_for_training)

    init_distributed(tp=1, pp=2)
    model, info = H.build_model(model_dir)
    vocab = info.vocab_size
    ddp = wrap_model_for_training([model])
    opt = build_optimizer(ddp, lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0)
    sched = build_lr_scheduler(opt, schedule="cosine", warmup_steps=2, total_steps=22)
    batch = H.fixed_batch(vocab, 8)
    lp_kw = dict(micro_batch_size=4, temperature=0.9, vocab_size=vocab)

    swap = build_reference(ddp, mode="swap", kl_coef=0.02)
    copy = ReferencePolicy("copy", ddp, model_factory=lambda: H.build_model(model_dir, load=False)[0])
    assert build_reference(ddp, mode="swap", kl_coef=0.0).logprobs(batch.input_ids) is None
    old = compute_logprobs(ddp, batch.input_ids, batch.completion_mask, **lp_kw)
    ref0 = swap.logprobs(batch.input_ids, batch.completion_mask, **lp_kw)
    report["ref_vs_policy_step0"] = float((ref0 - old).abs().max())
    assert torch.equal(ref0, old)  # slime's check: at step 0 the reference IS the policy
    batch.old_logprobs = old
    batch.ref_logprobs = ref0

    step = GRPOTrainStep(ddp, opt, sched, micro_batch_size=4, temperature=0.9, vocab_size=vocab,
                         loss=dict(kl_coef=0.02, eps_low=0.2))
    hist = [step(batch) for _ in range(20)]
    losses = [h["loss"] for h in hist]
    report["losses"] = losses
    report["kl_ref_step0"] = hist[0].get("kl_ref", float("nan"))
    assert abs(report["kl_ref_step0"]) <= 1e-6, report["kl_ref_step0"]
    assert all(h["skipped"] == 0.0 for h in hist)
    assert losses[-1] < losses[0] - 0.05, losses
    # warmup 2 from 0, then cosine from 3e-3 to 3e-4 over steps 2..22 (lr used by update s)
    want = [3e-3 * s / 2 if s <= 2 else 3e-4 + 0.5 * (math.cos(math.pi * (s - 2) / 20) + 1) * 2.7e-3
            for s in range(20)]
    report["lr_err"] = max(abs(h["lr"] - w) for h, w in zip(hist, want))
    assert report["lr_err"] <= 1e-9, [h["lr"] for h in hist]

    # reference: swap and copy agree, differ from the trained policy, and swap leaves it intact
    before = _params(ddp)
    ref_swap = swap.logprobs(batch.input_ids, batch.completion_mask, **lp_kw)
    assert _same(before, _params(ddp)), "swap did not restore the policy weights bit-exactly"
    ref_copy = copy.logprobs(batch.input_ids, batch.completion_mask, **lp_kw)
    now = compute_logprobs(ddp, batch.input_ids, batch.completion_mask, **lp_kw)
    report["ref_swap_vs_copy"] = float((ref_swap - ref_copy).abs().max())
    report["ref_vs_policy_after"] = float((ref_swap - now).abs().max())
    assert torch.equal(ref_swap, ref_copy)
    assert torch.equal(ref_swap, ref0)  # the reference did not move while the policy trained
    assert report["ref_vs_policy_after"] > 1e-3

    # non-finite loss: nothing changes, counted, LR schedule not advanced; then training resumes
    bad = H.fixed_batch(vocab, 8)
    bad.old_logprobs, bad.ref_logprobs = batch.old_logprobs, batch.ref_logprobs
    bad.advantages = bad.advantages.clone()
    bad.advantages[3] = float("nan")
    before = _params(ddp)
    lr_before = opt.param_groups[0]["lr"]
    m = step(bad)
    report["skip_metrics"] = {k: m[k] for k in ("skipped", "skipped_steps", "loss")}
    assert m["skipped"] == 1.0 and m["skipped_steps"] == 1.0 and step.skipped_steps == 1
    assert not math.isfinite(m["loss"])
    assert _same(before, _params(ddp)), "a skipped step changed the weights"
    assert opt.param_groups[0]["lr"] == lr_before
    m = step(batch)
    assert m["skipped"] == 0.0 and m["skipped_steps"] == 1.0 and math.isfinite(m["grad_norm"])
    assert not _same(before, _params(ddp))


def phase_b(report: dict, model_dir: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, init_distributed
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training

    ps.destroy_model_parallel()
    init_distributed(tp=1, pp=1)
    layout = current_layout()
    assert layout.dp == 2
    batch = H.fixed_batch(500, 8, seed=3)
    batch.old_logprobs = torch.zeros_like(batch.completion_mask) - 3.0
    shard = batch.shard_for_dp(layout.dp_rank, layout.dp)
    finals = {}
    for dist_opt in (False, True):
        model, info = H.build_model(model_dir)
        ddp = wrap_model_for_training([model], use_distributed_optimizer=dist_opt)
        opt = build_optimizer(ddp, lr=1e-3, clip_grad=1.0, use_distributed_optimizer=dist_opt)
        subs = getattr(opt, "chained_optimizers", [opt])
        assert any(type(o).__name__ == "DistributedOptimizer" for o in subs) == dist_opt, [type(o) for o in subs]
        step = GRPOTrainStep(ddp, opt, micro_batch_size=2, vocab_size=info.vocab_size)
        for _ in range(3):
            assert step(shard)["skipped"] == 0.0
        bad = shard.select(slice(None))
        bad.advantages = bad.advantages.clone()
        bad.advantages[0] = float("inf")
        before = _params(ddp)
        assert step(bad)["skipped"] == 1.0
        assert _same(before, _params(ddp))
        # finite loss, but the gradient norm overflows fp32: skipped as well
        huge = shard.select(slice(None))
        huge.advantages = torch.full_like(huge.advantages, 1e36)
        m = step(huge)
        report.setdefault("huge_adv", []).append({k: m[k] for k in ("loss", "grad_norm", "skipped")})
        assert math.isfinite(m["loss"]) and not math.isfinite(m["grad_norm"]) and m["skipped"] == 1.0, m
        assert _same(before, _params(ddp)) and step.skipped_steps == 2
        finals[dist_opt] = before
    report["dist_opt_vs_plain"] = max(float((finals[True][k] - finals[False][k]).abs().max()) for k in finals[True])
    assert report["dist_opt_vs_plain"] <= 1e-6, report["dist_opt_vs_plain"]


def training_loop(model_dir: str) -> dict:
    from megatron_grpo.distributed.init import destroy_distributed

    report: dict = {}
    phase_a(report, model_dir)
    phase_b(report, model_dir)
    destroy_distributed()
    return report
