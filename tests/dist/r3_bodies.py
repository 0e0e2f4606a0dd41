"""Rank body of the R3 test (tests/test_routing_replay_r3.py): a colocated vLLM engine that captures the
experts its fused-MoE chose for every token (rollout/routed_capture.py) and a tiny Qwen3-MoE trainer at
EP=2 (DP=2); rollouts, real optimizer steps and weight syncs, each pass measured without replay, with R2
and with R3."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist.moe_bodies import _build, _reinit

LOSS = dict(kl_coef=0.0, entropy_coef=0.0, eps_low=0.2, eps_high=0.28, agg_mode="token-mean")


def _sets(t):
    return t.sort(-1).values


def _share(a, b, recorded, lengths) -> list:
    """[differing, total] (token, layer) expert sets of records ``a`` vs ``b`` at recorded positions."""
    pos = torch.arange(a.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    valid = recorded & pos[..., None]
    diff = (_sets(a) != _sets(b)).any(-1) & valid
    return [int(diff.sum()), int(valid.sum())]


def _sum_dp(vals):
    from megatron.core import parallel_state as ps

    t = torch.tensor(vals, dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def _lp_mismatch(lp, rollout_lp, mask) -> dict:
    """Trainer-vs-rollout logprob mismatch over completion tokens, over all DP ranks."""
    from megatron.core import parallel_state as ps

    d = (lp - rollout_lp).abs() * mask
    s, n = _sum_dp([float(d.sum()), float(mask.sum())])
    m = torch.tensor([float(d.max())], dtype=torch.float64)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return {"mean_abs": s / n, "max_abs": float(m)}


def r3_capture(model_dir: str, steps: int = 3, lr: float = 0.05) -> dict:
    from megatron_grpo.bridge import WeightBridge
    from megatron_grpo.distributed.init import destroy_distributed
    from megatron_grpo.models import routing_replay as RR
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig, SamplingConfig
    from megatron_grpo.trainer.batching import rollout_to_tensors
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training
    from megatron_grpo.training.batch import GRPOBatch
    from megatron_grpo.training.token_budget import row_lengths

    layout = _reinit(1, 2, 1)
    model, info = _build(model_dir)
    chunks = wrap_model_for_training([model])
    opt = build_optimizer(chunks, lr=lr, clip_grad=0.0)
    engine = ColocatedEngine(EngineConfig(model=model_dir, max_model_len=128, kv_cache_memory_bytes=16 << 20,
                                          capture_routed_experts=True))
    bridge = WeightBridge(chunks, engine, info, bucket_mb=0.25)
    prompts = torch.randint(0, 440, (4, 6), generator=torch.Generator().manual_seed(7)).tolist()
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12)
    lp_kw = dict(temperature=1.0, vocab_size=info.vocab_size)
    steppers = {mode: GRPOTrainStep(chunks, opt, micro_batch_size=2, loss=LOSS, **lp_kw, routing_replay=mode)
                for mode in ("none", "r2", "r3")}
    per_rank = len(prompts) * sampling.n // layout.dp
    rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    r = {"dp": layout.dp, "steps": []}
    for step in range(steps):
        batch = engine.generate(prompts, sampling, seed=11 + step)
        t = rollout_to_tensors(batch, pad_id=0)
        ids, mask, rollout_lp = t.input_ids[rows], t.completion_mask[rows], t.rollout_logprobs[rows]
        experts = batch.routed_experts[rows]
        r.setdefault("record_shapes_ok", True)
        r["record_shapes_ok"] &= all(list(e.shape) == [len(p) + len(c) - 1, 2, 2] for e, p, c in
                                     zip(batch.routed_experts, batch.prompt_token_ids, batch.completion_token_ids))
        rollout_rec = RR.from_rollout(chunks, experts, ids.shape[1])
        recorded = (rollout_rec.tensor != rollout_rec.tensor[..., :1]).any(-1)  # [b, T, L]: not the last token
        lengths = row_lengths(mask)
        # the old pass at the rollout's weights: its free routing (the R2 record) vs vLLM's
        r2_rec = RR.RoutingRecord(*ids.shape)
        old_lp = compute_logprobs(chunks, ids, mask, micro_batch_size=2, routing=RR.RoutingPass(chunks, "record", r2_rec),
                                  **lp_kw)
        s = {"old_pass_vs_rollout": _sum_dp(_share(r2_rec.tensor, rollout_rec.tensor, recorded, lengths)),
             "old_lp_vs_rollout": _lp_mismatch(old_lp, rollout_lp, mask)}
        adv = torch.tensor([1.0, -1.0] * (ids.shape[0] // 2))
        gb = GRPOBatch(input_ids=ids, completion_mask=mask, advantages=adv, old_logprobs=old_lp,
                       rollout_logprobs=rollout_lp)
        # at the rollout's weights and after one update (a second mini-batch / epoch sees these)
        for phase in ("same_weights", "after_update"):
            if phase == "after_update":
                gb.routing = None
                steppers["none"](gb)
            for mode, routing in (("none", rollout_rec.tensor), ("r2", r2_rec.tensor), ("r3", rollout_rec.tensor)):
                gb.routing = routing
                m = steppers[mode].compute_gradients(gb)
                key = f"{phase}/{mode}"
                s[key] = {"lp": _lp_mismatch(steppers[mode].last_logprobs, rollout_lp, mask),
                          "changed_vs_batch_routing": m["moe/routing_changed_frac"],
                          "rollout_diff": m.get("moe/rollout_routing_diff_frac"),
                          "load": {k: v for k, v in m.items() if k.startswith("moe/load_")}}
                if mode == "r2":  # the routing used is the R2 record: its share against the rollout's
                    c, n = _sum_dp(_share(r2_rec.tensor, rollout_rec.tensor, recorded, lengths))
                    s[key]["vs_rollout"] = c / n
                elif mode == "r3":  # used = the rollout's (replayed); the router's own choice vs it
                    s[key]["vs_rollout"] = m["moe/routing_changed_frac"]
                else:
                    s[key]["vs_rollout"] = m["moe/routing_changed_frac"]
        # R3's replay in a plain forward: the used routing is the rollout's, exactly
        with RR.observing(RR.routers(chunks)) as maps:
            compute_logprobs(chunks, ids, mask, micro_batch_size=ids.shape[0],
                             routing=RR.RoutingPass(chunks, "replay", rollout_rec), **lp_kw)
        s["replayed_forward_changed"] = _sum_dp(list(RR.changed_choices(maps, rollout_rec.tensor, lengths)))
        bridge.sync()  # the engine gets the updated weights for the next rollout
        r["steps"].append(s)
    engine.shutdown()
    destroy_distributed()
    return r
