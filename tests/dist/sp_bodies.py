"""Rank body (2 ranks, TP=2, fp32): sequence parallelism with the local spec changes nothing.

For a Qwen2 (qkv bias) and a Qwen3 (q/k RMSNorm) tiny model and for sequence lengths 12 (a multiple
of TP) and 11 (not: the step and ``compute_logprobs`` pad it), the same HF weights are loaded twice,
SP off and SP on; ``compute_logprobs`` (with entropy) and the DDP-reduced GRPO gradients of
``GRPOTrainStep.compute_gradients`` must agree. Without the TP all-reduce of the norm weights'
gradients (``models/norms.py``) the norm gradients would differ by about half.
"""
from __future__ import annotations

import torch

from tests.dist import training_helpers as H


def _build(model_dir, sequence_parallel):
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config
    from megatron_grpo.training import build_optimizer, wrap_model_for_training

    info = load_model_info(model_dir)
    config = transformer_config(info, tp=ps.get_tensor_model_parallel_world_size(), pp=1,
                                sequence_parallel=sequence_parallel, te=False)
    model = build_gpt_model(info, config, te=False)
    load_hf_weights(model, model_dir, info)
    ddp = wrap_model_for_training([model])
    return ddp, build_optimizer(ddp, lr=1e-3, clip_grad=0.0), info


def sp_parity(model_dirs: list) -> dict:
    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.models.norms import SequenceParallelRMSNorm
    from megatron_grpo.training import GRPOTrainStep
    from megatron_grpo.training.batch import GRPOBatch

    init_distributed(tp=2, pp=1)
    report = {}
    for model_dir in model_dirs:
        runs = {}
        for sp in (False, True):
            ddp, opt, info = _build(model_dir, sp)
            norms = [m for m in ddp[0].modules() if isinstance(m, SequenceParallelRMSNorm)]
            if sp:  # every norm (layers, q/k, final) is ours and marked for the TP all-reduce
                assert norms and all(m.weight.sequence_parallel for m in norms), norms
                report.setdefault("sp_norms", {})[info.arch] = len(norms)
            else:
                assert not norms
            full = H.fixed_batch(info.vocab_size, 6, seed=3)
            for seq in (12, 11):
                batch = GRPOBatch(input_ids=full.input_ids[:, :seq], completion_mask=full.completion_mask[:, :seq],
                                  advantages=full.advantages)
                lp, ent = compute_logprobs(ddp, batch.input_ids, batch.completion_mask, micro_batch_size=4,
                                           temperature=0.9, vocab_size=info.vocab_size, with_entropy=True)
                assert lp.shape == (6, seq) and ent.shape == (6, seq)
                batch.old_logprobs = (lp + 0.2 * torch.sin(torch.arange(seq, dtype=torch.float32))) * batch.completion_mask
                step = GRPOTrainStep(ddp, opt, micro_batch_size=4, temperature=0.9, vocab_size=info.vocab_size,
                                     loss=dict(eps_low=0.2, eps_high=0.28, entropy_coef=0.01))
                metrics = step.compute_gradients(batch)
                runs[(sp, seq)] = (lp, ent, H.gather_full(ddp, info, grads=True), metrics["loss"])
        for seq in (12, 11):
            (lp0, ent0, g0, l0), (lp1, ent1, g1, l1) = runs[(False, seq)], runs[(True, seq)]
            key = f"{info.arch}_seq{seq}"
            norm_keys = [k for k in g0 if "layernorm" in k]
            report[key] = {
                "logprob_err": float((lp0 - lp1).abs().max()), "entropy_err": float((ent0 - ent1).abs().max()),
                "grad_err": max(float((g0[k] - g1[k]).abs().max()) for k in g0),
                "norm_grad_err": max(float((g0[k] - g1[k]).abs().max()) for k in norm_keys),
                "norm_grad_max": max(float(g0[k].abs().max()) for k in norm_keys),
                "loss_err": abs(l0 - l1), "same_params": sorted(g0) == sorted(g1),
            }
    destroy_distributed()
    return report
