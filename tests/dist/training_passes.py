"""Rank body (2 ranks): the on-policy shortcut and token-budget micro-batches on real megatron-core.

Phase A, TP1 x PP2 (variable micro-batch shapes cross the pipeline), phase B, TP1 x PP1 x DP2
(token-balanced DP shards); in each:

1. On-policy shortcut (``trainer.passes.old_policy_logprobs`` -> None, ``grpo_loss(old=None)``)
   vs today's path (a separate ``compute_logprobs`` pass as the old policy): metrics (loss, grad
   norm, IS weights, mismatch metrics), updated parameters and the training forward's logprobs are
   bit-identical; model forward calls are counted: the shortcut runs one pass fewer.
2. Token-budget micro-batches vs fixed micro-batches: same loss and DDP-summed gradients (fp32
   summation order aside), same logprobs, less padding.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from tests.dist import training_helpers as H

SEQ = 40
LOSS = dict(kl_coef=0.05, eps_low=0.2, eps_high=0.28, is_level="token", is_cap=2.0, entropy_coef=0.01)
TEMP = 0.9


def long_tailed_batch(vocab: int, n_rows: int = 12, seed: int = 0):
    """Most completions short, a few reach the end (as in reasoning RL), with ref/rollout logprobs."""
    from megatron_grpo.training.batch import GRPOBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n_rows, SEQ), generator=g)
    mask = torch.zeros(n_rows, SEQ)
    for b in range(n_rows):
        prompt = 3 + b % 4
        comp = SEQ - prompt if b % 5 == 1 else 2 + (7 * b) % 6
        mask[b, prompt : prompt + comp] = 1
        ids[b, prompt + comp :] = 0
    adv = torch.randn(n_rows, generator=g)
    return GRPOBatch(input_ids=ids, completion_mask=mask, advantages=adv)


def _params(chunks):
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


def _fresh(model_dir):
    from megatron_grpo.training import build_optimizer, wrap_model_for_training

    model, info = H.build_model(model_dir)
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ddp = wrap_model_for_training([model])
    return ddp, build_optimizer(ddp, lr=1e-3, clip_grad=1.0), info, calls


def _cfg(update_epochs=1, mini_batches=1):
    return OmegaConf.create({"algorithm": {"update_epochs": update_epochs, "mini_batches": mini_batches,
                                           "kl_in_reward": False, "kl_coef": LOSS["kl_coef"]}})


def on_policy_exact(report, key, model_dir, shard, max_tokens):
    """Today's path (separate old pass) vs the shortcut: bit-identical, one forward pass fewer."""
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.trainer.passes import old_policy_logprobs
    from megatron_grpo.training import GRPOTrainStep

    lp_kw = dict(micro_batch_size=3, temperature=TEMP, max_tokens=max_tokens)
    out = {}
    for name, cfg in (("full", _cfg(update_epochs=2)), ("shortcut", _cfg())):
        ddp, opt, info, calls = _fresh(model_dir)
        b = shard.select(slice(None))
        b.old_logprobs = old_policy_logprobs(cfg, ddp, b.input_ids, b.completion_mask, vocab_size=info.vocab_size,
                                             **lp_kw)
        assert (b.old_logprobs is None) == (name == "shortcut")
        step = GRPOTrainStep(ddp, opt, micro_batch_size=3, temperature=TEMP, vocab_size=info.vocab_size,
                             loss=LOSS, max_tokens_per_microbatch=max_tokens)
        m = step(b)
        old = b.old_logprobs if b.old_logprobs is not None else step.last_logprobs
        out[name] = (m, _params(ddp), calls[0], old, step.last_logprobs, m["num_microbatches"])
    (m_f, p_f, c_f, old_f, last_f, n_mb), (m_s, p_s, c_s, old_s, last_s, _) = out["full"], out["shortcut"]
    assert m_f == m_s, {k: (m_f[k], m_s.get(k)) for k in m_f if m_f[k] != m_s.get(k)}
    assert p_f.keys() == p_s.keys() and all(torch.equal(p_f[k], p_s[k]) for k in p_f)
    if last_f is not None:  # last pipeline stage: the training forward's logprobs are the old pass's
        assert torch.equal(last_f, old_f) and torch.equal(last_s, old_f)
    assert c_f - c_s == n_mb, (c_f, c_s, n_mb)  # exactly one pass (n_mb micro-batch forwards) fewer
    assert m_s["rollout_logprob_abs_diff_max"] > 0 and m_s["is_weight_max"] > 0  # mismatch metrics, IS used
    report[f"{key}_onpolicy"] = {"forward_calls_full": c_f, "forward_calls_shortcut": c_s,
                                 "loss": m_s["loss"], "grad_norm": m_s["grad_norm"]}


def budget_vs_fixed(report, key, model_dir, batch, shard_fixed, shard_budget, max_tokens):
    """Token-budget micro-batches give the fixed micro-batches' loss, gradients and logprobs."""
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.training import GRPOTrainStep

    ddp, opt, info, _ = _fresh(model_dir)
    res = {}
    for name, shard, mt in (("fixed", shard_fixed, None), ("budget", shard_budget, max_tokens)):
        step = GRPOTrainStep(ddp, opt, micro_batch_size=4, temperature=TEMP, vocab_size=info.vocab_size, loss=LOSS,
                             max_tokens_per_microbatch=mt)
        m = step.compute_gradients(shard)
        lp = compute_logprobs(ddp, batch.input_ids, batch.completion_mask, micro_batch_size=4, temperature=TEMP,
                              vocab_size=info.vocab_size, max_tokens=mt)
        res[name] = (m, H.gather_full(ddp, info, grads=True), lp)
    (m_f, g_f, lp_f), (m_b, g_b, lp_b) = res["fixed"], res["budget"]
    grad_err = max(float((g_f[k] - g_b[k]).abs().max()) for k in g_f)
    scale = max(float(g.abs().max()) for g in g_f.values())
    rep = {"grad_err": grad_err, "grad_max": scale, "loss_fixed": m_f["loss"], "loss_budget": m_b["loss"],
           "logprob_err": float((lp_f - lp_b).abs().max()), "padding_fixed": m_f["padding_frac"],
           "padding_budget": m_b["padding_frac"], "microbatches": (m_f["num_microbatches"], m_b["num_microbatches"])}
    report[f"{key}_budget"] = rep
    assert abs(m_f["loss"] - m_b["loss"]) <= 1e-6, rep
    assert grad_err <= 1e-6 * max(1.0, scale), rep
    assert rep["logprob_err"] <= 1e-5, rep
    assert float((lp_b * (1 - batch.completion_mask)).abs().max()) == 0.0
    assert m_b["normalizer"] == m_f["normalizer"]
    assert m_b["padding_frac"] < 0.6 * m_f["padding_frac"], rep


def passes(model_dir: str) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, destroy_distributed, init_distributed
    from megatron_grpo.models.provider import load_model_info
    from megatron_grpo.trainer.passes import dp_shard_rows

    vocab = load_model_info(model_dir).vocab_size
    batch = long_tailed_batch(vocab)
    g = torch.Generator().manual_seed(7)
    m = batch.completion_mask
    batch.ref_logprobs = (-2.0 + 0.3 * torch.randn(m.shape, generator=g)) * m
    batch.rollout_logprobs = (-6.0 + 0.3 * torch.randn(m.shape, generator=g)) * m  # vLLM-side values
    report: dict = {}
    for tp, pp in ((1, 2), (1, 1)):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_distributed(tp=tp, pp=pp)
        layout = current_layout()
        key = f"tp{tp}pp{pp}dp{layout.dp}"
        fixed_rows = dp_shard_rows(batch.batch_size, layout)
        budget_rows = dp_shard_rows(batch.batch_size, layout, m, 96)
        on_policy_exact(report, key, model_dir, batch.select(fixed_rows), None)
        on_policy_exact(report, key + "_tok96", model_dir, batch.select(budget_rows), 96)
        budget_vs_fixed(report, key, model_dir, batch, batch.select(fixed_rows), batch.select(budget_rows), 96)
    destroy_distributed()
    return report
