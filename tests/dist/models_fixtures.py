"""Tiny HF folders that make weight-mapping bugs visible.

``make_tiny_model`` initialises norms to 1 and biases to 0 with std 0.02 weights: a swapped norm, a
dropped bias or a wrong qkv order would barely move the logits. Here every tensor is re-drawn (norms
1 +- 0.3, biases ~0.3, weights ~1/sqrt(fan_in), embeddings 0.05) so logits are O(1) (std ~0.8) and every
tensor matters. The three models also cover: tied embeddings + llama3 RoPE scaling + 4 layers
(Llama), qkv bias + a vocab that needs padding (Qwen2, 509), qk-norm + 4 query heads per KV group +
a sharded safetensors folder with an index (Qwen3).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECS = {
    "llama": dict(arch="llama", tie_word_embeddings=True, num_layers=4, vocab_size=512,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=False, num_layers=2, vocab_size=509,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=64),
    "qwen3": dict(arch="qwen3", tie_word_embeddings=False, num_layers=2, vocab_size=512,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32),
}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _redraw(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.3 * noise
    if name.endswith(".bias"):
        return 0.3 * noise
    if "embed_tokens" in name or "lm_head" in name:
        return 0.05 * noise
    return noise / t.shape[1] ** 0.5


def _write_sharded(tensors: dict, out: Path, num_files: int) -> None:
    from safetensors.torch import save_file

    names = list(tensors)
    weight_map = {}
    for i in range(num_files):
        fname = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_files]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_test_models(root, archs=("llama", "qwen2", "qwen3"), seed: int = 0) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    out = {}
    for k, arch in enumerate(archs):
        d = Path(root) / arch
        make_tiny_model(d, TinyModelSpec(**SPECS[arch], seed=seed + k), overwrite=True)
        gen = torch.Generator().manual_seed(1000 + seed + k)
        tensors = {n: _redraw(n, t, gen).contiguous() for n, t in sorted(load_file(str(d / "model.safetensors")).items())}
        if arch == "llama":
            cfg = json.loads((d / "config.json").read_text())
            cfg["rope_parameters"] = dict(LLAMA3_ROPE)
            cfg["max_position_embeddings"] = 16384  # llama3 scaling expects original (8192) < max
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
        if arch == "qwen3":
            (d / "model.safetensors").unlink()
            _write_sharded(tensors, d, num_files=3)
        else:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        out[arch] = str(d)
    return out
