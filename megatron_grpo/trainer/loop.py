"""The GRPO loop, top to bottom: prompts -> rollout -> rewards -> advantages -> logprobs -> update -> sync.

Every rank runs this function (torchrun / srun). Rollout results and rewards are identical on every
rank; each data-parallel rank then trains on its contiguous share of the batch.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_grpo.algorithms import group_advantages, kl_in_reward, sequence_kl
from megatron_grpo.trainer import batching
from megatron_grpo.trainer.checkpoint import CheckpointWriter, PreemptionFlag
from megatron_grpo.trainer.parity import check_rollout_parity


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[megatron-grpo] {msg}", flush=True)


def _agree(flag: bool) -> bool:
    """True on every rank if it is True on any rank (signals may reach ranks at different times)."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def run_training(cfg: DictConfig) -> int:
    from megatron_grpo.config import save_config
    from megatron_grpo.data.sampler import ResumablePromptSampler
    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.trainer import components as C
    from megatron_grpo.lifetime import forked_children_die_with_this_process
    from megatron_grpo.trainer.inputs import check_inputs
    from megatron_grpo.trainer.run_dir import start_run
    from megatron_grpo.trainer.metrics_log import MetricsLogger
    from megatron_grpo.trainer.state import load_training_state

    # Preemption handlers first: a USR1/TERM during the (slow) start-up must not kill the rank.
    preempt = PreemptionFlag()
    forked_children_die_with_this_process()  # megatron's checkpoint writers (forked) never outlive a lost rank
    # ---- inputs, before any process group: bad input fails in seconds ------------------------------
    tokenizer, data, num_steps, context_len, run = check_inputs(cfg)  # trainer/inputs.py; writes no run output
    out_dir = Path(cfg.trainer.output_dir)
    writer = CheckpointWriter(out_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last, run_id=run.run_id)
    resume_dir = run.resume_dir

    # ---- components -----------------------------------------------------------------------------------
    layout = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.trainer.seed,
                              timeout_s=cfg.parallel.timeout_s, ep=cfg.parallel.ep)
    rank0 = layout.rank == 0
    policy = C.build_policy_stack(cfg, num_steps=num_steps)
    engine = C.build_engine(cfg, max_model_len=context_len)
    from megatron_grpo.bridge.sync import WeightBridge

    bridge = WeightBridge(policy.chunks, engine, policy.info, bucket_mb=cfg.rollout.sync_bucket_mb)
    scorer = _start_helpers(cfg, preempt)
    sampler = ResumablePromptSampler(len(data.train), global_batch_size=cfg.algorithm.num_prompts_per_step,
                                     seed=cfg.data.seed)
    start_step, weight_version = 0, 0
    if resume_dir is not None:
        state = load_training_state(resume_dir, model_chunks=policy.chunks, optimizer=policy.optimizer,
                                    scheduler=policy.scheduler, seed=cfg.trainer.seed)
        start_step, weight_version = state["step"], state["weight_version"]
        sampler.load_state_dict(state["sampler"])
        policy.train_step.skipped_steps = state.get("skipped_steps", 0)
        _log(f"resumed from {resume_dir} at step {start_step}")
    bridge.sync(version=weight_version)  # vLLM starts from the policy's (possibly resumed) weights
    prefetch = _off_policy_rollout(cfg, engine, bridge, data, sampler, weight_version, num_steps,
                                   state if resume_dir is not None else None, start_step)  # async_steps=1, else None
    if rank0:  # the first write: a start that failed above left the folder's run as it was
        start_run(run)
        save_config(cfg, out_dir)
    logger = MetricsLogger(out_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                           config=OmegaConf.to_container(cfg), resume_step=start_step) if rank0 else None
    from megatron_grpo.trainer.progress import StepProgress

    progress = StepProgress(start_step=start_step, total=num_steps, log_every=cfg.trainer.log_every,
                            bar=cfg.logging.progress_bar, line=progress_line) if rank0 else None
    _log(f"layout tp={layout.tp} pp={layout.pp} dp={layout.dp}; {len(data.train)} train prompts; "
         f"steps {start_step + 1}..{num_steps}")

    # ---- the loop ---------------------------------------------------------------------------------------
    step = start_step
    try:
        while step < num_steps:
            step += 1
            metrics = grpo_step(cfg, step=step, data=data, sampler=sampler, engine=engine, scorer=scorer,
                                policy=policy, bridge=bridge, layout=layout, tokenizer=tokenizer, logger=logger,
                                prefetch=prefetch)
            if cfg.trainer.eval_steps and (step % cfg.trainer.eval_steps == 0 or step == num_steps):
                if prefetch is not None:
                    prefetch.sync_for_eval()
                metrics.update(run_eval(cfg, step=step, data=data, engine=engine, scorer=scorer))
            if rank0:
                logger.log(step, metrics)
                progress.update(step, metrics)  # a bar on a terminal, else a line every trainer.log_every steps
            stop = _agree(preempt.set)
            if stop or step == num_steps or (cfg.checkpoint.save_steps and step % cfg.checkpoint.save_steps == 0):
                save(cfg, writer, step, policy=policy, sampler=sampler, version=bridge.version, layout=layout,
                     prefetch=prefetch)
            if stop:
                _log(f"preemption signal {preempt.received}: checkpoint of step {step} saved; exiting")
                break
        if step == num_steps and cfg.trainer.export_at_end:
            export(cfg, policy=policy, out_dir=out_dir / "export_hf", step=step, logger_dir=out_dir)
    finally:
        if logger is not None:
            logger.close()
            progress.close()
        scorer.close()
        preempt.restore()
        engine.shutdown()
        destroy_distributed()
    return 0


def _off_policy_rollout(cfg, engine, bridge, data, sampler, weight_version, num_steps, state, start_step):
    """``rollout.async_steps=1``: the in-flight generation (``rollout/prefetch.py``), with a resumed
    checkpoint's in-flight batch; None for on-policy runs."""
    if not cfg.rollout.get("async_steps", 0):
        return None
    from megatron_grpo.rollout.prefetch import OffPolicyRollout
    from megatron_grpo.trainer.components import sampling_config
    from megatron_grpo.trainer.state import INFLIGHT_KEY

    prefetch = OffPolicyRollout(cfg, engine=engine, bridge=bridge, data=data, sampler=sampler,
                                sampling=sampling_config(cfg, n=cfg.rollout.num_generations),
                                policy_version=weight_version, num_steps=num_steps, log=_log)
    if state is not None:
        prefetch.load_state_dict(state.get(INFLIGHT_KEY), next_step=start_step + 1)
    return prefetch


def _start_helpers(cfg, preempt):
    """The reward pool and dist_checkpointing's results queue, started immune to Slurm's signals
    (a helper killed by them breaks the final save) and watched by a guard process
    (``rollout/engine_guard.py``): once this rank is gone, SIGKILLed included, the guard gives
    them a few seconds and then kills them. Without it they outlived a killed rank as orphans
    (immune to torchrun's SIGTERM, and a multiprocessing manager never notices its owner's death)."""
    from megatron_grpo.rollout.engine_guard import descendants, start_guard
    from megatron_grpo.trainer.scoring import BatchScorer

    before = set(descendants(os.getpid()))
    with preempt.children_immune():
        scorer = BatchScorer(cfg)
        _start_checkpoint_helper()
    helpers = sorted(set(descendants(os.getpid())) - before)
    if helpers:
        start_guard(lambda: helpers, "the trainer's helper processes")  # never released: acts once this rank is gone
    return scorer


def _start_checkpoint_helper() -> None:
    """dist_checkpointing's save starts a multiprocessing manager on first use; start it now, while
    children are immune to Slurm's signals (megatron-core private API: feature-detected)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    start = getattr(filesystem_async, "get_write_results_queue", None)  # megatron-core >= 0.17 (mp_mode=...)
    if callable(start):
        start(mp_mode="spawn")
        return
    start = getattr(filesystem_async, "_get_write_results_queue", None)  # 0.16
    if callable(start):
        start()


def load_tokenizer(cfg):
    """The model folder's tokenizer, checked against the model: ids beyond the embedding would crash later."""
    import json

    from transformers import AutoTokenizer

    path = Path(cfg.model.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # OSError/ValueError/... from transformers: one line naming the folder
        raise ValueError(f"model.path: cannot load a tokenizer from {path} ({str(e).splitlines()[0][:200]})") from None
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    if len(tokenizer) > vocab:
        raise ValueError(f"model.path: the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size "
                         f"is {vocab}: tokenizer and model do not belong together")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model.path: the tokenizer in {path} has no chat_template (prompts use the chat format)")
    return tokenizer


def grpo_step(cfg, *, step, data, sampler, engine, scorer, policy, bridge, layout, tokenizer, logger,
              prefetch=None) -> dict:
    """One GRPO step on every rank; returns this step's metrics (identical on every rank)."""
    from megatron_grpo.trainer.passes import dp_shard_rows, gather_rows, old_policy_logprobs, routing_record
    from megatron_grpo.training.batch import GRPOBatch

    a, G = cfg.algorithm, cfg.rollout.num_generations
    timer = PhaseTimer()
    # 1. prompts -> G completions each (same batch on every rank)
    with timer("rollout"):
        rollout, result, extra = sample_informative_batch(cfg, step=step, data=data, sampler=sampler, engine=engine,
                                                          scorer=scorer, G=G,
                                                          first=prefetch.take(step) if prefetch else None)
    if prefetch is not None:  # async_steps=1: sync v_{k-1} (nothing in flight now), start step k+1's generate
        extra = {**extra, **prefetch.check(rollout)}
        with timer("sync"):
            prefetch.sync_engine()
        with timer("rollout_launch"):
            prefetch.launch(step)
    engine.sleep()  # CUDA: free the engine's memory for training (no-op on CPU)
    rewards = torch.tensor(result.total, dtype=torch.float32)
    tensors = batching.rollout_to_tensors(rollout, pad_id=tokenizer.pad_token_id)
    mask = batching.loss_mask(tensors, excluded=result.excluded, overlong_filtering=a.overlong_filtering)

    # 2. logprobs of the completions under the policy that generated them, and the reference
    rows = dp_shard_rows(len(rollout), layout, mask, a.max_tokens_per_microbatch)
    ids, shard_mask = tensors.input_ids[rows], mask[rows]
    lp_kwargs = dict(micro_batch_size=a.logprob_micro_batch_size or a.micro_batch_size,
                     temperature=cfg.rollout.temperature, vocab_size=policy.info.vocab_size,
                     max_tokens=a.max_tokens_per_microbatch)
    with timer("logprobs"):
        r3 = [rollout.routed_experts[i] for i in torch.arange(len(rollout))[rows].tolist()] \
            if rollout.routed_experts else None  # R3: the rollout engine's experts of this shard
        record = routing_record(cfg, policy.info, ids, r3, policy.chunks)  # MoE: each row's experts (R2 / R3)
        old_lp = old_policy_logprobs(cfg, policy.chunks, ids, shard_mask, routing_record=record, **lp_kwargs)
        replay = record if a.routing_replay in ("r2", "r3") else None
        ref_lp = policy.reference.logprobs(ids, shard_mask, routing_record=replay, **lp_kwargs)
    if step == 1 and cfg.trainer.logprob_check_at_start and old_lp is not None:
        check_rollout_parity(cfg, old_lp, tensors.rollout_logprobs[rows], shard_mask, log=_log)

    # 3. advantages over whole groups (KL folded into the reward when configured)
    if a.kl_in_reward and ref_lp is not None:
        seq_kl = gather_rows(sequence_kl(old_lp, ref_lp, shard_mask, kind=a.kl_kind, clamp=a.kl_clamp), rows,
                             len(rollout), layout)
        rewards = kl_in_reward(rewards, seq_kl, a.kl_coef)
    advantages = group_advantages(rewards, G, scale=a.adv_scale, leave_one_out=a.leave_one_out)

    # 4. policy updates: update_epochs passes x mini_batches optimizer steps over this rank's share
    batch = GRPOBatch(input_ids=ids, completion_mask=shard_mask, advantages=advantages[rows], old_logprobs=old_lp,
                      ref_logprobs=ref_lp, rollout_logprobs=tensors.rollout_logprobs[rows],
                      routing=None if record is None else record.tensor)
    with timer("train"):
        updates = [policy.train_step(mb) for _ in range(a.update_epochs) for mb in _split(batch, a.mini_batches)]
    if step == 1 and cfg.trainer.logprob_check_at_start and old_lp is None:  # the training forward's, pre-update
        check_rollout_parity(cfg, policy.train_step.last_logprobs, tensors.rollout_logprobs[rows], shard_mask,
                             log=_log)
    # 5. weight sync into vLLM
    if prefetch is not None:
        prefetch.trained()  # the engine gets these weights at the next step, once its batch is joined
    else:
        with timer("sync"):
            bridge.sync()

    m = summarize_step(rollout, result, rewards, advantages, tensors, updates, timer, extra, scorer)
    if layout.rank == 0:
        from megatron_grpo.trainer.scoring import report_reward_failures

        report_reward_failures(result, step=step, logger=logger, log=_log)
    if logger is not None and cfg.trainer.samples_every and step % cfg.trainer.samples_every in (0, 1):
        logger.log_samples(step, [{"prompt": tokenizer.decode(rollout.prompt_token_ids[i]),
                                   "completion": rollout.completion_texts[i], "reward": result.total[i]}
                                  for i in range(min(len(rollout), 2 * G))])
    return m


def sample_informative_batch(cfg, *, step, data, sampler, engine, scorer, G, first=None):
    """Generate and score; with dynamic sampling (DAPO) drop zero-variance groups and refill.
    ``first``: (prompt indices, batch) of the first generate, made earlier (async rollout)."""
    from megatron_grpo.rollout.prefetch import rollout_seed
    from megatron_grpo.trainer.components import sampling_config

    wanted, tries, kept, results, dropped = cfg.algorithm.num_prompts_per_step, 0, [], [], 0
    sampling = sampling_config(cfg, n=G)
    while True:
        tries += 1
        if tries == 1 and first is not None:
            idx, rollout = first
            rows = data.train.select(idx)
        else:
            idx = sampler.next_global_batch()
            rows = data.train.select(idx)
            rollout = engine.generate(list(rows["prompt_ids"]), sampling, seed=rollout_seed(cfg, step, tries))
        sols = [s for s in rows["solution"] for _ in range(G)]
        result = scorer(rollout.completion_texts, solutions=sols, completion_ids=rollout.completion_token_ids,
                        group_ids=[i // G for i in range(len(rollout))])
        if not cfg.algorithm.dynamic_sampling:
            return rollout, result, {}
        groups = batching.informative_groups(torch.tensor(result.total), G)
        dropped += rollout.num_prompts - len(groups)
        kept.append(batching.select_groups(rollout, groups))
        results.append((result, groups))
        if sum(b.num_prompts for b in kept) >= wanted or tries >= cfg.algorithm.dynamic_sampling_max_batches:
            break
    stats = {"dynamic_sampling/batches": tries, "dynamic_sampling/dropped_groups": dropped}
    from megatron_grpo.trainer.scoring import with_all_rounds  # failures of dropped groups count too

    if not any(len(b) for b in kept):  # nothing informative: the last batch as is (all advantages 0)
        return rollout, with_all_rounds(result, [r for r, _ in results]), stats
    merged, merged_result = merge_informative(kept, results, G, wanted)
    return merged, with_all_rounds(merged_result, [r for r, _ in results]), stats


def merge_informative(kept, results, G, wanted):
    """Concatenate the informative groups of several generate+score rounds, up to `wanted` prompts."""
    from megatron_grpo.rewards import RewardBatchResult
    from megatron_grpo.rollout.types import RolloutBatch

    nonempty = [b for b in kept if len(b)]
    total, excluded, rewards = [], [], {}
    for result, groups in results:
        keep = [i for g in groups for i in range(g * G, (g + 1) * G)]
        total += [result.total[i] for i in keep]
        excluded += [result.excluded[i] for i in keep]
        for k, v in result.rewards.items():
            rewards.setdefault(k, []).extend(v[i] for i in keep)
    n = min(wanted, sum(b.num_prompts for b in nonempty)) * G
    merged = RolloutBatch(group_size=G, weight_version=nonempty[0].weight_version,
                          **{k: [x for b in nonempty for x in getattr(b, k)][:n] for k in RolloutBatch._PER_COMPLETION})
    metrics = dict(results[-1][0].metrics)
    return merged, RewardBatchResult(rewards={k: v[:n] for k, v in rewards.items()}, total=total[:n],
                                     excluded=excluded[:n], metrics=metrics)


def _split(batch, parts: int):
    base, extra = divmod(batch.batch_size, parts)
    lo = 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        yield batch.select(slice(lo, hi))
        lo = hi


class PhaseTimer:
    def __init__(self):
        self.seconds, self._t0 = {}, time.monotonic()

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.monotonic()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.monotonic() - self.t

        return _Ctx()

    def total(self) -> float:
        return time.monotonic() - self._t0


def summarize_step(rollout, result, rewards, advantages, tensors, updates, timer, extra, scorer) -> dict:
    G = rollout.group_size
    groups = rewards.view(-1, G)
    m = {k: v for k, v in result.metrics.items() if not k.endswith("compute_seconds")}
    m["reward/mean"] = float(rewards.mean())
    m["reward/std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
    m["reward/group_std_mean"] = float(groups.std(dim=1).mean())
    m["reward/zero_std_groups"] = float(((groups.max(1).values - groups.min(1).values) == 0).sum())
    m["advantage/mean"], m["advantage/std"] = float(advantages.mean()), float(advantages.std())
    m["advantage/min"], m["advantage/max"] = float(advantages.min()), float(advantages.max())
    lengths = tensors.completion_lengths.float()
    m["completion/length_mean"], m["completion/length_max"] = float(lengths.mean()), float(lengths.max())
    m["completion/truncated_frac"] = float(tensors.truncated.float().mean())
    for key in sorted({k for u in updates for k in u}):
        vals = [u[key] for u in updates if key in u]
        m[f"train/{key}"] = vals[-1] if key in ("skipped_steps",) else sum(vals) / len(vals)
    m["tokens"] = float(sum(len(p) for p in rollout.prompt_token_ids) + lengths.sum())
    total = timer.total()
    m.update({f"time/{k}": v for k, v in timer.seconds.items()})
    m["time/step"] = total
    m["tokens_per_second"] = m["tokens"] / total
    m["rollout/weight_version"] = float(rollout.weight_version)
    m.update({k: float(v) for k, v in extra.items()})
    m.update({f"{k}_total": float(v) for k, v in scorer.counters().items()})
    return m


def progress_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"reward {m['reward/mean']:.3f}"]
    for k, v in m.items():
        if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2 and k != "reward/total/mean":
            parts.append(f"{k.split('/')[1]} {v:.3f}")
    for key, label in (("train/loss", "loss"), ("train/kl_ref", "kl"), ("train/grad_norm", "gnorm"),
                       ("eval/accuracy", "eval_acc"), ("time/step", "s")):
        if key in m:
            parts.append(f"{label} {m[key]:.3g}")
    return " | ".join(parts)


def run_eval(cfg, *, step, data, engine, scorer) -> dict:
    from megatron_grpo.trainer.components import sampling_config
    from megatron_grpo.trainer.evaluate import evaluate_prompts

    if data.test is None:
        return {}
    test = data.test.select(range(min(cfg.trainer.eval_max_prompts, len(data.test))))
    n = cfg.trainer.eval_num_generations
    ks = tuple(k for k in (1, 2, 4, 8, 16, 32) if k <= n)
    return evaluate_prompts(engine, list(test["prompt_ids"]), list(test["solution"]), scorer,
                            sampling=sampling_config(cfg, n=n), seed=step, ks=ks)


def save(cfg, writer, step, *, policy, sampler, version, layout, prefetch=None) -> None:
    from megatron_grpo.trainer.state import INFLIGHT_KEY, save_training_state

    t = time.monotonic()
    extra = {}
    if prefetch is not None:  # async: the policy is a version ahead of the engine; the batch in flight is saved
        version, extra = prefetch.policy_version, {INFLIGHT_KEY: prefetch.state_dict()}
    final = save_training_state(
        writer, step, model_chunks=policy.chunks, optimizer=policy.optimizer, scheduler=policy.scheduler,
        trainer_state={"sampler": sampler.state_dict(), "weight_version": version,
                       "skipped_steps": policy.train_step.skipped_steps, **extra},
        meta={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp})
    _log(f"checkpoint {final} ({time.monotonic() - t:.1f}s)")


def export(cfg, *, policy, out_dir: Path, step: int, logger_dir: Path) -> None:
    from megatron_grpo.trainer.export import export_policy

    export_policy(cfg, policy=policy, out_dir=out_dir, step=step, metrics_path=logger_dir / "metrics.jsonl")
    _log(f"exported HF model to {out_dir}")


if __name__ == "__main__":
    sys.exit("use `megatron-grpo train --config ...`")
