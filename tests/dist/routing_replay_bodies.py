"""Rank body of the R2 routing-replay test (tests/test_routing_replay.py): one launch, real optimizer
steps on a tiny Qwen3-MoE at EP=2 (DP=2), the old pass recorded under three micro-batchings."""
from __future__ import annotations

import torch

from tests.dist import training_helpers as H
from tests.dist.moe_bodies import _build, _reinit

LOSS = dict(kl_coef=0.0, entropy_coef=0.0, eps_low=0.2, eps_high=0.28, agg_mode="token-mean")
SPLITS = {"mbs1": dict(micro_batch_size=1), "mbs2": dict(micro_batch_size=2), "mbs8": dict(micro_batch_size=8),
          "budget": dict(micro_batch_size=8, max_tokens=30)}


def _sets(t):
    return t.sort(-1).values


def routing_replay_layouts(model_dir: str, layouts: list, **kw) -> dict:
    """:func:`routing_replay` at each ``(tp, ep, pp, sequence_parallel)`` of ``layouts`` in one launch."""
    from megatron_grpo.distributed.init import destroy_distributed

    out = {f"tp{tp}ep{ep}pp{pp}{'sp' if sp else ''}": routing_replay(model_dir, ep=ep, tp=tp, pp=pp, sp=sp,
                                                                   destroy=False, **kw)
           for tp, ep, pp, sp in layouts}
    destroy_distributed()
    return out


def routing_replay(model_dir: str, ep: int = 2, lr: float = 0.05, updates: int = 3, tp: int = 1, pp: int = 1,
                   sp: bool = False, destroy: bool = True) -> dict:
    from megatron_grpo.distributed.init import destroy_distributed
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.models.provider import load_model_info
    from megatron_grpo.models.reference import ReferencePolicy
    from megatron_grpo.models.routing_replay import RoutingPass, RoutingRecord
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training
    from megatron_grpo.training.token_budget import row_lengths

    info = load_model_info(model_dir)
    layout = _reinit(tp, ep, pp)
    model, _ = _build(model_dir, info=info, sequence_parallel=sp)
    chunks = wrap_model_for_training([model])
    opt = build_optimizer(chunks, lr=lr, clip_grad=0.0)
    # every DP rank: the same row lengths (other tokens), so token-budget plans give every EP rank the same
    # number of micro-batches (the alltoall dispatcher needs that; the planner does not enforce it)
    batch = H.fixed_batch(info.vocab_size, 8, seed=3 + layout.dp_rank)
    ids, mask = batch.input_ids, batch.completion_mask
    lp_kw = dict(temperature=1.0, vocab_size=info.vocab_size)
    lengths = row_lengths(mask)
    valid = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    r = {"dp": layout.dp, "ep": ep, "pp": pp}

    # 1. the old pass records each row's experts: the same record whatever the micro-batching
    recs = {}
    for key in ("mbs2", "mbs8", "budget"):
        kw = SPLITS[key]
        rec = RoutingRecord(*ids.shape)
        old = compute_logprobs(chunks, ids, mask, routing=RoutingPass(chunks, "record", rec), **kw, **lp_kw)
        recs[key] = (rec, old)
    # the trainer's own old pass (trainer/passes.py): a record only when there is an old pass
    from omegaconf import OmegaConf

    from megatron_grpo.trainer.passes import old_policy_logprobs, routing_record

    algo = dict(update_epochs=1, mini_batches=1, kl_in_reward=False, kl_coef=0.0)
    r["record_on_policy"] = routing_record(OmegaConf.create({"algorithm": algo}), info, ids) is not None
    cfg = OmegaConf.create({"algorithm": {**algo, "mini_batches": 2}})
    record = routing_record(cfg, info, ids)
    old_lp = old_policy_logprobs(cfg, chunks, ids, mask, routing_record=record, micro_batch_size=2, **lp_kw)
    r["trainer_old_pass_equal"] = bool(torch.equal(record.tensor, recs["mbs2"][0].tensor)) and \
        bool(torch.equal(old_lp, recs["mbs2"][1]))
    r["record_shape"] = list(record.tensor.shape)
    r["record_split_equal"] = all(bool(torch.equal(_sets(recs[k][0].tensor)[valid], _sets(record.tensor)[valid]))
                                  for k in recs)
    r["old_split_err"] = max(float(((recs[k][1] - old_lp) * mask).abs().max()) for k in recs)
    reference = ReferencePolicy("swap", chunks)  # the weights of the old pass

    # 2. real updates; the first one at the old pass's weights (no routing can change yet)
    batch.old_logprobs, batch.routing = old_lp, record.tensor
    # at the old pass's weights: another micro-batching (3 rows) may flip near-tied experts (fp32 sums in
    # another order; measured, not asserted), the old pass's own micro-batching (2 rows) flips none
    probe = GRPOTrainStep(chunks, opt, micro_batch_size=3, loss=LOSS, **lp_kw, routing_replay="none")
    r["changed_same_weights_mbs3"] = probe.compute_gradients(batch)["moe/routing_changed_frac"]
    step_none = GRPOTrainStep(chunks, opt, micro_batch_size=2, loss=LOSS, **lp_kw, routing_replay="none")
    first = step_none(batch)
    r["changed_first_update"] = first["moe/routing_changed_frac"]
    r["aux_metrics"] = {k: v for k, v in first.items() if k.startswith("moe/")}
    if pp == 1:  # the first update routed as recorded: its expert load, independently from the record
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_grpo.models.moe_load import load_stats

        onehot = torch.zeros(*record.tensor.shape[:3], info.num_experts, dtype=torch.float64)
        onehot.scatter_(-1, record.tensor.long(), 1.0)
        counts = (onehot * valid[:, :, None, None]).sum(dim=(0, 1))  # [L, E]
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        mx, mn, ent = load_stats(counts)
        r["load_from_record"] = {"moe/load_max_share": mx, "moe/load_min_share": mn,
                                 "moe/load_entropy": ent / counts.shape[0]}
    for _ in range(updates - 1):
        step_none(batch)

    # 3. after the updates: without replay some tokens take other experts; with R2 none does, at every split
    r["changed_none"] = step_none.compute_gradients(batch)["moe/routing_changed_frac"]
    forced = compute_logprobs(chunks, ids, mask, micro_batch_size=2,
                              routing=RoutingPass(chunks, "replay", record), **lp_kw)
    free = compute_logprobs(chunks, ids, mask, micro_batch_size=2, **lp_kw)
    r["free_vs_forced"] = float(((free - forced) * mask).abs().max())
    r["changed_r2"], r["r2_vs_forced"] = {}, {}
    for key, kw in SPLITS.items():
        step = GRPOTrainStep(chunks, opt, loss=LOSS, **lp_kw, routing_replay="r2",
                             micro_batch_size=kw["micro_batch_size"], max_tokens_per_microbatch=kw.get("max_tokens"))
        m = step.compute_gradients(batch)
        r["changed_r2"][key] = m["moe/routing_changed_frac"]
        if step.last_logprobs is not None:  # the last pipeline stage
            r["r2_vs_forced"][key] = float(((step.last_logprobs - forced) * mask).abs().max())
    # 4. the reference pass replays too (its weights are the old pass's: the old logprobs, exactly)
    ref_lp = reference.logprobs(ids, mask, routing_record=record, micro_batch_size=8, **lp_kw)
    r["ref_vs_old"] = float(((ref_lp - old_lp) * mask).abs().max())
    if destroy:
        destroy_distributed()
    return r
