"""Shared pieces of the training rank bodies: a tiny GPTModel, full-tensor gather/shard by global
name (to compare layouts), and a fixed GRPO batch.

Models are built directly with megatron-core here (not through models/provider.py), so these tests
do not depend on the HF mapping; the gather/shard rules are the Megatron layouts measured in
shared/notes/stack-facts.md: column-parallel dim 0 (qkv per query group, so a plain cat), fc1 per
rank = [gate shard; up shard], row-parallel dim 1, vocab-parallel dim 0, norms replicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB = 120  # true vocabulary; the model holds PADDED_VOCAB rows (padding rows masked in the softmax)
PADDED_VOCAB = 128
SEQ = 12


def build_model(seed: int = 1234):
    """A 4-layer GQA/SwiGLU/RMSNorm/RoPE GPTModel for the current TP/PP layout (fp32, CPU init)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        kv_channels=16, normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
    )
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=PADDED_VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )


def _bare(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _global_name(model, name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _is_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def gather_full(model, *, grads: bool = False) -> dict:
    """{global name: full tensor (CPU)} of params (or DDP main grads), identical on every rank."""
    from megatron.core import parallel_state as ps

    bare = _bare(model)
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    local = {}
    for name, p in bare.named_parameters():
        t = (p.main_grad if grads else p).detach().float().contiguous()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t, group=group)
            dim = p.partition_dim
            if _is_fc1(name):
                halves = [s.chunk(2, dim=0) for s in shards]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                t = torch.cat(shards, dim=dim)
        local[_global_name(bare, name)] = t.cpu()
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
    full = {}
    for d in stages:
        full.update(d)
    return full


@torch.no_grad()
def load_full(model, full: dict) -> None:
    """Copy this rank's shard of each full tensor into the model (inverse of gather_full)."""
    from megatron.core import parallel_state as ps

    bare = _bare(model)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, p in bare.named_parameters():
        t = full[_global_name(bare, name)]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            if _is_fc1(name):
                gate, up = t.chunk(2, dim=0)
                t = torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]], dim=0)
            else:
                t = t.chunk(tp, dim=p.partition_dim)[r]
        p.copy_(t)


def fixed_batch(n_rows: int = 8, seed: int = 0):
    """Rows of ``prompt | completion | padding`` with different prompt and completion lengths, so
    micro-batches and DP shards hold different token counts (the classic normalisation bug shows)."""
    from megatron_grpo.training.batch import GRPOBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n_rows, SEQ), generator=g)
    mask = torch.zeros(n_rows, SEQ, dtype=torch.float32)
    for b in range(n_rows):
        prompt = 2 + b % 3
        comp = 1 + (5 * b + 3) % (SEQ - prompt)
        mask[b, prompt : prompt + comp] = 1
        ids[b, prompt + comp :] = 0  # padding token
    adv = torch.randn(n_rows, generator=g)
    return GRPOBatch(input_ids=ids, completion_mask=mask, advantages=adv)
