"""Trainer-vs-vLLM logprob mismatch of a correct and of a deliberately skipped weight sync, per dtype.

Why: the step-1 parity check (``trainer/parity.py``) must pass every correct run and fail a broken
one, in fp32 and in bf16. This measures the two checked statistics (``rollout_logprob_abs_diff`` =
mean |Δlogprob| over sampled tokens, ``rollout_ratio_outside_frac`` = share of tokens whose
probability ratio leaves [0.5, 2]) on the real stack: the tiny CPU config's model (Megatron policy
with DDP + the Megatron optimizer, colocated vLLM, the weight bridge) at TP=2 on 2 ranks:

* ``correct``: sync, generate, Megatron logprobs of the samples (what step 1 checks);
* ``trained+synced``: ``--steps`` real GRPO optimizer steps, sync, generate again (must stay correct);
* ``skipped sync``: ``--steps`` more optimizer steps WITHOUT a sync, generate, compare (broken);
* ``perturbed``: sync, then every Megatron parameter changed by ~2% noise (a wrong mapping).

Usage (from the repo root, after one run of the tiny config has made ``runs/tiny_cpu``)::

    python -m torch.distributed.run --nproc-per-node 2 bench/logprob_mismatch.py --dtype float32|bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _measure(cfg, policy, engine, data, tokenizer, *, seed: int) -> dict:
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.trainer import batching
    from megatron_grpo.trainer.components import sampling_config
    from megatron_grpo.trainer.parity import rollout_parity_stats

    rows = data.train.select(range(cfg.algorithm.num_prompts_per_step))
    rollout = engine.generate(list(rows["prompt_ids"]), sampling_config(cfg, n=cfg.rollout.num_generations), seed=seed)
    tensors = batching.rollout_to_tensors(rollout, pad_id=tokenizer.pad_token_id)
    mask = batching.loss_mask(tensors, excluded=[False] * len(rollout), overlong_filtering=False)
    lp = compute_logprobs(policy.chunks, tensors.input_ids, mask, micro_batch_size=cfg.algorithm.micro_batch_size,
                          temperature=cfg.rollout.temperature, vocab_size=policy.info.vocab_size)
    stats = rollout_parity_stats(lp, tensors.rollout_logprobs, mask)
    return {"stats": stats, "tensors": tensors, "mask": mask, "old_lp": lp}


def _train(policy, m: dict, steps: int, seed: int) -> None:
    from megatron_grpo.training.batch import GRPOBatch

    g = torch.Generator().manual_seed(seed)
    n = m["tensors"].input_ids.shape[0]
    adv = torch.randn(n, generator=g)  # real optimizer steps in a random direction (as a GRPO step would)
    batch = GRPOBatch(input_ids=m["tensors"].input_ids, completion_mask=m["mask"], advantages=adv,
                      old_logprobs=m["old_lp"])
    for _ in range(steps):
        out = policy.train_step(batch)
        assert out["skipped"] == 0.0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="one per launch")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps before the skipped sync")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)

    import torch.distributed as dist

    from megatron_grpo.bridge.policy import perturb_
    from megatron_grpo.bridge.sync import WeightBridge
    from megatron_grpo.config import load_config
    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.trainer import components as C
    from megatron_grpo.trainer.loop import load_tokenizer

    results = {}
    for i, dtype in enumerate([args.dtype]):
        cfg = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml",
                          ["parallel.tp=2", f"model.dtype={dtype}", *overrides])
        tokenizer = load_tokenizer(cfg)
        data = C.load_prompt_data(cfg, tokenizer)
        if i == 0:
            init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.trainer.seed)
            rank = dist.get_rank()
        policy = C.build_policy_stack(cfg, num_steps=100)
        engine = C.build_engine(cfg, max_model_len=C.max_model_len(cfg))
        bridge = WeightBridge(policy.chunks, engine, policy.info, bucket_mb=cfg.rollout.sync_bucket_mb)
        try:
            bridge.sync()
            subs = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
            opt = "+".join(type(o).__name__ for o in subs)
            main_dtype = {str(pp.dtype) for g in policy.optimizer.param_groups for pp in g["params"]}
            correct = _measure(cfg, policy, engine, data, tokenizer, seed=1)
            _train(policy, correct, args.steps, seed=2)
            bridge.sync()
            synced = _measure(cfg, policy, engine, data, tokenizer, seed=3)
            _train(policy, synced, args.steps, seed=4)  # ... and no sync
            skipped = _measure(cfg, policy, engine, data, tokenizer, seed=5)
            bridge.sync()
            for chunk in policy.chunks:  # a wrong mapping / foreign weights: every parameter off by ~2%
                perturb_(chunk.module, seed=6, scale=0.02)
            perturbed = _measure(cfg, policy, engine, data, tokenizer, seed=7)
        finally:
            engine.shutdown()
        results[dtype] = {"optimizer": opt, "optimizer_param_dtypes": sorted(main_dtype),
                          "correct": correct["stats"], "trained+synced": synced["stats"],
                          f"skipped sync ({args.steps} steps)": skipped["stats"], "perturbed 0.02": perturbed["stats"],
                          "tokens": int((correct["mask"] != 0).sum())}
        del policy, engine, bridge
    if rank == 0:  # (the engine's shutdown ends the process group)
        keys = ("rollout_logprob_abs_diff", "rollout_ratio_outside_frac", "rollout_logprob_abs_diff_max",
                "token_mult_prob_error")
        print(f"{'dtype':9} {'case':26} " + " ".join(f"{k:>28}" for k in keys))
        for dtype, r in results.items():
            print(f"{dtype:9} optimizer {r['optimizer']} main params {r['optimizer_param_dtypes']}; "
                  f"{r['tokens']} sampled tokens per case")
            for case in [c for c in r if c not in ("optimizer", "optimizer_param_dtypes", "tokens")]:
                print(f"{dtype:9} {case:26} " + " ".join(f"{r[case].get(k, float('nan')):28.3e}" for k in keys))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    if dist.is_initialized():
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
