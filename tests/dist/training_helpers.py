"""Shared pieces of the training rank bodies: the policy built through the project's provider from a
tiny HF folder (Qwen2: GQA, qkv bias, SwiGLU, RMSNorm, RoPE; vocab 500 padded to 512 rows), full
tensors gathered by global name (to compare layouts), and a fixed GRPO batch."""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ = 12


def make_model_dir(path) -> str:
    """Tiny HF model folder (run once in the pytest process, before torchrun)."""
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(arch="qwen2", vocab_size=500, num_layers=2, hidden_size=128, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.05)
    return str(make_tiny_model(path, spec, overwrite=True))


def build_model(model_dir: str, *, load: bool = True):
    """(model chunk for this rank's TP/PP position, ModelInfo); HF weights loaded unless ``load=False``."""
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config

    info = load_model_info(model_dir)
    config = transformer_config(info, tp=ps.get_tensor_model_parallel_world_size(),
                                pp=ps.get_pipeline_model_parallel_world_size())
    model = build_gpt_model(info, config)
    if load:
        load_hf_weights(model, model_dir, info)
    return model, info


def gather_full(chunks, info, *, grads: bool = False) -> dict:
    """{global Megatron name: full tensor (CPU fp32)} of params or DDP main grads, on every rank."""
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.hf_mapping import tp_gather
    from megatron_grpo.models.loader import named_global_parameters

    tp = ps.get_tensor_model_parallel_world_size()
    local = {}
    for name, p in named_global_parameters(chunks):
        t = (p.main_grad if grads else p).detach().float().contiguous()
        if tp > 1:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t, group=ps.get_tensor_model_parallel_group())
            t = tp_gather(name, shards, info)
        local[name] = t.cpu()
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
    full = {}
    for d in stages:
        full.update(d)
    return full


def fixed_batch(vocab: int, n_rows: int = 8, seed: int = 0):
    """Rows of ``prompt | completion | padding`` with different prompt and completion lengths, so
    micro-batches and DP shards hold different token counts (the classic normalisation bug shows)."""
    from megatron_grpo.training.batch import GRPOBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_rows, SEQ), generator=g)
    mask = torch.zeros(n_rows, SEQ, dtype=torch.float32)
    for b in range(n_rows):
        prompt = 2 + b % 3
        comp = 1 + (5 * b + 3) % (SEQ - prompt)
        mask[b, prompt : prompt + comp] = 1
        ids[b, prompt + comp :] = 0  # padding token
    adv = torch.randn(n_rows, generator=g)
    return GRPOBatch(input_ids=ids, completion_mask=mask, advantages=adv)
