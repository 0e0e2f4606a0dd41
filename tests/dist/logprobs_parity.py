"""Rank body: vocab-parallel logprobs at TP=2 equal the single-rank full-vocab reference.

Every rank builds the same full logits, keeps its own vocabulary shard, and compares values and
gradients (w.r.t. its shard) with naive log_softmax/gather on the full logits.
"""
from __future__ import annotations

import torch


def parity(tol: float = 1e-5) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.models.logprobs import naive_logprobs, vocab_parallel_logprobs

    layout = init_distributed(tp=2, pp=1)
    tp, rank = layout.tp, layout.tp_rank
    n, v = 37, 128
    vl = v // tp
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(n, v, generator=gen) * 4
    w_lp, w_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    errors = {}
    # vocab 128: no padding; 100: rank 1 holds 36 real ids + 28 padding; 60: rank 1 holds only padding
    for vocab in (128, 100, 60):
        targets = torch.randint(0, vocab, (n,), generator=gen)
        for temperature in (1.0, 0.7):
            ref_in = full.clone().requires_grad_()
            ref_lp, ref_ent = naive_logprobs(ref_in, targets, temperature=temperature, vocab_size=vocab,
                                             with_entropy=True)
            ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()
            ref_grad = ref_in.grad[:, rank * vl : (rank + 1) * vl]
            for chunk in (1, 5, 1000):
                for inplace in (False, True):
                    leaf = full[:, rank * vl : (rank + 1) * vl].clone().requires_grad_()
                    lp, ent = vocab_parallel_logprobs(leaf * 1.0, targets, temperature=temperature,
                                                      vocab_size=vocab, chunk_size=chunk, with_entropy=True,
                                                      inplace_backward=inplace)
                    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
                    key = f"V{vocab}_T{temperature}_c{chunk}_{'inplace' if inplace else 'copy'}"
                    errors[key] = [float((lp - ref_lp).abs().max()), float((ent - ref_ent).abs().max()),
                                   float((leaf.grad - ref_grad).abs().max())]
                    assert max(errors[key]) <= tol, (key, errors[key])
            # logprob-only gradient (no entropy path), default chunk
            leaf = full[:, rank * vl : (rank + 1) * vl].clone().requires_grad_()
            lp = vocab_parallel_logprobs(leaf, targets, temperature=temperature, vocab_size=vocab)
            lp.sum().backward()
            ref_in = full.clone().requires_grad_()
            naive_logprobs(ref_in, targets, temperature=temperature, vocab_size=vocab).sum().backward()
            err = float((leaf.grad - ref_in.grad[:, rank * vl : (rank + 1) * vl]).abs().max())
            assert err <= tol, ("lp-only grad", vocab, temperature, err)

    # Cross-check against megatron-core's own kernel (it overwrites fp32 input: give it a copy).
    targets = torch.randint(0, v, (n,), generator=gen)
    shard = full[:, rank * vl : (rank + 1) * vl]
    ce = vocab_parallel_cross_entropy(vocab_parallel_logits=shard.clone()[None], target=targets[None])[0]
    ours = vocab_parallel_logprobs(shard, targets)
    errors["vs_megatron_ce"] = float((ours + ce).abs().max())
    assert errors["vs_megatron_ce"] <= tol, errors["vs_megatron_ce"]
    assert ps.get_tensor_model_parallel_world_size() == 2
    # bf16 shard in, fp32 math
    lp16 = vocab_parallel_logprobs(shard.bfloat16(), targets)
    errors["bf16_input_vs_fp32_of_bf16"] = float((lp16 - naive_logprobs(full.bfloat16(), targets)).abs().max())
    assert errors["bf16_input_vs_fp32_of_bf16"] <= tol
    destroy_distributed()
    return {"rank": rank, "max_error": max(max(e) if isinstance(e, list) else e for e in errors.values()),
            "errors": errors}
