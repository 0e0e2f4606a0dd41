"""Rank body (4 ranks): the GRPO gradient is the full-batch gradient for every layout and split.

1. A tiny HF Qwen2 folder (vocab 500, padded to 512 rows) is loaded through the project's provider
   and loader at TP1/PP1; a plain single-process autograd pass over the
   WHOLE batch (naive full-vocab log_softmax, ``grpo_loss`` with the full-batch normaliser, no
   schedule, no DDP) gives the reference loss and per-parameter gradients.
2. For layouts TP1xPP1 (DP4), TP2xPP1 (DP2), TP2xPP2 (DP1), the same HF weights are loaded, each DP
   rank takes its shard, and ``GRPOTrainStep.compute_gradients`` runs with several micro-batch
   sizes and two aggregation modes. The DDP-reduced gradients are gathered to full tensors by
   global name and compared with the reference; the loss metric with the reference loss.
3. ``compute_logprobs`` at each layout equals the reference logprobs on every rank (incl. first
   pipeline stages, which receive them by broadcast).
"""
from __future__ import annotations

import torch

from tests.dist import training_helpers as H


def _reference(model_dir, batch, loss_kwargs, temperature, logprobs_only=False):
    """Plain autograd over the whole batch on a bare TP1 model: (lp, {mode: (loss, grads)})."""
    from megatron_grpo.algorithms import grpo_loss, loss_normalizer
    from megatron_grpo.models.loader import named_global_parameters
    from megatron_grpo.models.logprobs import naive_logprobs

    model, info = H.build_model(model_dir)
    named = list(named_global_parameters(model))
    names = [n for n, _ in named]
    pos = torch.arange(H.SEQ)[None].expand(batch.batch_size, H.SEQ)
    out = {}
    lp_ref = None
    for mode in ("token-mean", "seq-mean-token-mean"):
        logits = model(input_ids=batch.input_ids, position_ids=pos, attention_mask=None)
        lp, ent = naive_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature=temperature,
                                 vocab_size=info.vocab_size, with_entropy=True)
        zero = torch.zeros(batch.batch_size, 1)
        lp, ent = torch.cat([zero, lp], 1), torch.cat([zero, ent], 1)  # align to token positions
        lp_ref = lp.detach()
        if logprobs_only:
            return lp_ref, None
        n = loss_normalizer(batch.completion_mask, mode)
        loss, _ = grpo_loss(lp, batch.old_logprobs, batch.advantages, batch.completion_mask, normalizer=n,
                            ref_logprobs=batch.ref_logprobs, entropy=ent, **dict(loss_kwargs, agg_mode=mode))
        grads = torch.autograd.grad(loss, [p for _, p in named])
        out[mode] = (float(loss), {k: g.detach().clone() for k, g in zip(names, grads)})
    return lp_ref, out


def grad_parity(model_dir: str, tol: float = 1e-5) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, destroy_distributed, init_distributed
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training

    temperature = 0.8
    loss_kwargs = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, eps_low=0.2, eps_high=0.28)
    init_distributed(tp=1, pp=1)
    from megatron_grpo.models.provider import load_model_info

    vocab = load_model_info(model_dir).vocab_size
    batch = H.fixed_batch(vocab, 8)
    # old/ref logprobs near the current policy, so some ratios fall outside the clip range
    lp0, _ = _reference(model_dir, batch, loss_kwargs, temperature, logprobs_only=True)
    g = torch.Generator().manual_seed(5)
    m = batch.completion_mask
    batch.old_logprobs = (lp0 + 0.25 * torch.randn(lp0.shape, generator=g)) * m
    batch.ref_logprobs = (lp0 + 0.1 * torch.randn(lp0.shape, generator=g)) * m
    lp_ref, ref = _reference(model_dir, batch, loss_kwargs, temperature)

    report = {"grad_err": {}, "loss_err": {}, "logprob_err": {}, "clip_frac": None}
    for tp, pp, mbs_list in ((1, 1, (1, 2)), (2, 1, (1, 4)), (2, 2, (8, 2, 3))):
        ps.destroy_model_parallel()
        init_distributed(tp=tp, pp=pp)
        layout = current_layout()
        model, info = H.build_model(model_dir)  # same HF weights loaded into this layout
        assert info.padded_vocab_size(tp) > vocab  # padded vocabulary rows are really exercised
        ddp = wrap_model_for_training([model])
        opt = build_optimizer(ddp, lr=1e-3, clip_grad=0.0)
        shard = batch.shard_for_dp(layout.dp_rank, layout.dp)

        lp = compute_logprobs(ddp, batch.input_ids, batch.completion_mask, micro_batch_size=3,
                              temperature=temperature, vocab_size=vocab)
        key = f"tp{tp}pp{pp}dp{layout.dp}"
        report["logprob_err"][key] = float(((lp - lp_ref) * m).abs().max())
        assert report["logprob_err"][key] <= tol, (key, report["logprob_err"][key])
        assert float((lp * (1 - m)).abs().max()) == 0.0

        for mode in ("token-mean", "seq-mean-token-mean"):
            for mbs in mbs_list:
                step = GRPOTrainStep(ddp, opt, micro_batch_size=mbs, temperature=temperature,
                                     vocab_size=vocab, loss=dict(loss_kwargs, agg_mode=mode))
                metrics = step.compute_gradients(shard)
                grads = H.gather_full(ddp, info, grads=True)
                ref_loss, ref_grads = ref[mode]
                err = max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads)
                assert set(grads) == set(ref_grads)
                name = f"{key}_{mode}_mbs{mbs}"
                report["grad_err"][name] = err
                report["loss_err"][name] = abs(metrics["loss"] - ref_loss)
                assert err <= tol, (name, err)
                assert report["loss_err"][name] <= 1e-6, (name, metrics["loss"], ref_loss)
                if report["clip_frac"] is None:
                    report["clip_frac"] = metrics.get("clip_frac_low", 0.0) + metrics.get("clip_frac_high", 0.0)
        report.setdefault("grad_norm_ref", max(float(v.abs().max()) for v in ref["token-mean"][1].values()))
    destroy_distributed()
    return report
