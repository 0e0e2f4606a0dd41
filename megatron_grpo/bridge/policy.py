"""Build a Megatron policy from an HF folder (for the doctor, the sync benchmark and tests).

The trainer builds its own model (with DDP and the optimizer); this is the minimal, identical
construction path: ``load_model_info`` -> ``transformer_config`` -> ``build_gpt_model`` ->
``load_hf_weights``, so the doctor checks the same layouts the trainer uses.
"""
from __future__ import annotations

import torch


def build_policy(model_dir: str, *, dtype: str = "float32"):
    """(model, info) for this rank's TP/PP position; ``init_distributed`` must have run."""
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config

    info = load_model_info(model_dir)
    config = transformer_config(info, tp=ps.get_tensor_model_parallel_world_size(),
                                pp=ps.get_pipeline_model_parallel_world_size(), dtype=dtype)
    model = build_gpt_model(info, config)
    load_hf_weights([model], model_dir, info)
    return model, info


@torch.no_grad()
def perturb_(model, seed: int, scale: float = 0.02) -> None:
    """Deterministically change every parameter (same change on every rank holding a copy).

    Noise is drawn per parameter from a generator seeded by (seed, parameter name, TP rank), so
    replicated parameters (norms) stay identical across TP ranks; used where a real optimizer step
    is not the point (the sync benchmark).
    """
    import zlib

    from megatron.core import parallel_state as ps

    from megatron_grpo.models import hf_mapping as hm
    from megatron_grpo.models.loader import named_global_parameters

    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, p in named_global_parameters([model]):
        info = model.megatron_grpo_info
        if info.tie_word_embeddings and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # the last stage's copy must stay tied
        replicated = hm.param_kind(info, name) == "replicated"
        key = zlib.crc32(f"{seed}:{name}:{0 if replicated else tp_rank}".encode())
        g = torch.Generator().manual_seed(key)
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
