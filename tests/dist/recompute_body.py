"""Rank body: gradients with activation recompute (model.recompute=full) equal those without."""
from __future__ import annotations

import torch


def recompute_grads(model_dir: str) -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config

    init_distributed(tp=1, pp=1, seed=7)
    info = load_model_info(model_dir)
    tokens = torch.randint(0, info.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    calls = {"backward": 0}
    original = mrandom.CheckpointFunction.backward

    def counting(ctx, *args):
        calls["backward"] += 1
        return original(ctx, *args)

    mrandom.CheckpointFunction.backward = staticmethod(counting)
    out = {}
    for mode in (None, "full"):
        config = transformer_config(info, tp=1, pp=1, dtype="float32", recompute=mode, perform_initialization=False)
        model = build_gpt_model(info, config)
        load_hf_weights(model, model_dir, info)
        model.train()
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)[..., : info.vocab_size]
        lp = torch.log_softmax(logits.float()[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        lp.mean().backward()
        out[str(mode)] = {"loss": float(lp.mean()), "backward_calls": calls["backward"],
                          "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    a, b = out["None"], out["full"]
    destroy_distributed()
    return {"loss_diff": abs(a["loss"] - b["loss"]), "params": len(a["grads"]),
            "same_names": sorted(a["grads"]) == sorted(b["grads"]),
            "grad_max_abs_diff": max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in a["grads"]),
            "grad_max_abs": max(float(g.abs().max()) for g in a["grads"].values()),
            "recomputed_backwards": b["backward_calls"] - a["backward_calls"]}
