"""Rank bodies for the rollout engine tests (real vLLM, real torch.distributed; no mocks)."""
from __future__ import annotations


def _summ(batch):
    return {
        "prompt_indices": batch.prompt_indices,
        "tokens": batch.completion_token_ids,
        "logprobs": batch.rollout_logprobs,
        "finish": batch.finish_reasons,
        "texts": batch.completion_texts,
        "prompt_ids": batch.prompt_token_ids,
        "version": batch.weight_version,
    }


def colocated_generate(model_dir: str, rollout_tp: int, prompts: list, group: int = 4) -> dict:
    """Generate twice with one seed and once with another; score the sampled sequences."""
    import torch.distributed as dist

    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig, SamplingConfig

    init_distributed(tp=1, pp=1)
    engine = ColocatedEngine(EngineConfig(model=model_dir, tensor_parallel_size=rollout_tp,
                                          max_model_len=256, kv_cache_memory_bytes=32 << 20))
    sampling = SamplingConfig(n=group, temperature=1.0, max_tokens=12)
    a = engine.generate(prompts, sampling, seed=11)
    b = engine.generate(prompts, sampling, seed=11)
    c = engine.generate(prompts, sampling, seed=12)
    # stop strings end a completion with finish reason "stop"
    stopped = engine.generate(prompts[:2], SamplingConfig(n=group, max_tokens=12, stop=("e",)), seed=3)
    seqs = [p + t for p, t in zip(a.prompt_token_ids, a.completion_token_ids)]
    scores = engine.score(seqs)
    # the default group is still usable after vLLM took over its sub-groups
    import torch

    x = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(x)
    return {"a": _summ(a), "b": _summ(b), "c": _summ(c), "stopped": _summ(stopped),
            "scores": scores, "allreduce": float(x), "dp": engine.dp, "replica": engine.replica}


def texts_match_vllm_detokenizer(model_dir: str, prompts: list, stop_token_ids: list) -> dict:
    """Our texts (vLLM's detokenizer off, ``decode_completions``) against vLLM's own incremental detokenizer on
    the same samples, for every (skip_special_tokens, include_stop_str_in_output)."""
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig, SamplingConfig, prompt_seed
    from megatron_grpo.rollout.engine import to_sampling_params

    init_distributed(tp=1, pp=1)
    engine = ColocatedEngine(EngineConfig(model=model_dir, max_model_len=256, kv_cache_memory_bytes=32 << 20))
    out = {}
    for skip in (False, True):
        for include in (True, False):
            sampling = SamplingConfig(n=8, temperature=1.5, max_tokens=24, stop_token_ids=tuple(stop_token_ids),
                                      skip_special_tokens=skip, include_stop_str_in_output=include)
            ours = engine.generate(prompts, sampling, seed=5)
            params = []
            for i in range(len(prompts)):
                params.append(to_sampling_params(sampling, prompt_seed(5, i, sampling.n), detokenize=True))
            theirs = engine.llm.generate(prompts, params, use_tqdm=False)
            completions = [c for req in theirs for c in sorted(req.outputs, key=lambda c: c.index)]
            tokenizer = engine.llm.get_tokenizer()
            out[f"{skip}-{include}"] = {"ours": ours.completion_texts, "tokens": ours.completion_token_ids,
                                        "finish": ours.finish_reasons,
                                        "alone": [tokenizer.decode(t, skip_special_tokens=skip)
                                                  for t in ours.completion_token_ids],
                                        "vllm": [c.text for c in completions],
                                        "vllm_tokens": [list(c.token_ids) for c in completions]}
    return out


def engine_start_beside_another_job(model_dir: str, meeting: str, job: str, other: str) -> dict:
    """One of two jobs that start a colocated vLLM TP=2 engine at the same moment (rank 0 of each waits,
    before its engine's init, for the other job's marker in ``meeting``), then generate."""
    import time
    from pathlib import Path

    import torch.distributed as dist

    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig, SamplingConfig

    init_distributed(tp=1, pp=1)
    if dist.get_rank() == 0:
        (Path(meeting) / job).touch()
        deadline = time.monotonic() + 300
        while not (Path(meeting) / other).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    dist.barrier()
    engine = ColocatedEngine(EngineConfig(model=model_dir, tensor_parallel_size=2, max_model_len=256,
                                          kv_cache_memory_bytes=32 << 20))
    out = engine.generate(["What is 3 + 4?"], SamplingConfig(n=2, temperature=1.0, max_tokens=4), seed=1)
    return {"tokens": out.completion_token_ids}
