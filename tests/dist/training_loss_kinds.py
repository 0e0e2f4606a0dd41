"""Rank body (2 ranks): GSPO and CISPO gradients through ``GRPOTrainStep`` equal the single-process
full-batch autograd gradient at TP2 (DP1) and TP1 (DP2), for several micro-batch sizes.

The reference is ``training_grad_parity._reference`` (plain autograd over the whole batch, naive
log_softmax, ``grpo_loss`` with the full-batch normaliser). GSPO's ratio is per sequence, so a
micro-batch or DP split that cut a sequence, or a local normaliser, would show up here.
"""
from __future__ import annotations

import torch

from tests.dist import training_helpers as H
from tests.dist.training_grad_parity import _reference

KINDS = {  # clip ranges chosen so that both branches (clipped and not) occur in the batch
    "gspo": dict(policy_loss_kind="gspo", eps_low=0.03, eps_high=0.04),
    "cispo": dict(policy_loss_kind="cispo", eps_low=None, eps_high=0.1),
}


def loss_kinds_parity(model_dir: str, tol: float = 1e-5) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, destroy_distributed, init_distributed
    from megatron_grpo.models.provider import load_model_info
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training

    temperature = 0.8
    init_distributed(tp=1, pp=1)
    vocab = load_model_info(model_dir).vocab_size
    batch = H.fixed_batch(vocab, 8)
    lp0, _ = _reference(model_dir, batch, {}, temperature, logprobs_only=True)
    g = torch.Generator().manual_seed(7)
    m = batch.completion_mask
    batch.old_logprobs = (lp0 + 0.15 * torch.randn(lp0.shape, generator=g)) * m
    batch.ref_logprobs = (lp0 + 0.1 * torch.randn(lp0.shape, generator=g)) * m
    common = dict(kl_coef=0.05, kl_kind="k3")
    refs = {k: _reference(model_dir, batch, dict(common, **kw), temperature)[1] for k, kw in KINDS.items()}

    report = {"grad_err": {}, "loss_err": {}, "clip_frac": {}}
    for tp, mbs_list in ((2, (8, 3)), (1, (1, 4))):
        ps.destroy_model_parallel()
        init_distributed(tp=tp, pp=1)
        layout = current_layout()
        model, info = H.build_model(model_dir)
        ddp = wrap_model_for_training([model])
        opt = build_optimizer(ddp, lr=1e-3, clip_grad=0.0)
        shard = batch.shard_for_dp(layout.dp_rank, layout.dp)
        for kind, kw in KINDS.items():
            for mode in ("token-mean", "seq-mean-token-mean"):
                for mbs in mbs_list:
                    step = GRPOTrainStep(ddp, opt, micro_batch_size=mbs, temperature=temperature,
                                         vocab_size=vocab, loss=dict(common, agg_mode=mode, **kw))
                    metrics = step.compute_gradients(shard)
                    grads = H.gather_full(ddp, info, grads=True)
                    ref_loss, ref_grads = refs[kind][mode]
                    name = f"{kind}_tp{tp}dp{layout.dp}_{mode}_mbs{mbs}"
                    report["grad_err"][name] = max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads)
                    report["loss_err"][name] = abs(metrics["loss"] - ref_loss)
                    report["clip_frac"][kind] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    report["ref_grad_max"] = {k: max(float(v.abs().max()) for v in r["token-mean"][1].values())
                              for k, r in refs.items()}
    destroy_distributed()
    return report
