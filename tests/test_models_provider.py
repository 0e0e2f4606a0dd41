"""HF config -> ModelInfo -> TransformerConfig, and the refusals users hit first (no torchrun)."""
import json

import pytest
import torch

from megatron_grpo.models.provider import (ModelConfigError, ModelDirError, check_parallel, load_model_info,
                                           padded_vocab_size, transformer_config)
from tests.dist.models_fixtures import LLAMA3_ROPE, make_test_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_test_models(tmp_path_factory.mktemp("hf"))


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_model_info_from_hf_configs(models):
    llama, qwen2, qwen3 = (load_model_info(models[a]) for a in ("llama", "qwen2", "qwen3"))
    assert (llama.arch, llama.tie_word_embeddings, llama.qkv_bias, llama.qk_layernorm) == ("llama", True, False, False)
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    assert (qwen2.arch, qwen2.tie_word_embeddings, qwen2.qkv_bias, qwen2.vocab_size) == ("qwen2", False, True, 509)
    assert (qwen3.qk_layernorm, qwen3.head_dim, qwen3.num_attention_heads, qwen3.num_query_groups) == (True, 32, 8, 2)
    assert qwen2.padded_vocab_size(1) == 512 and qwen2.padded_vocab_size(4) == 512
    assert load_model_info(models["qwen2"], make_vocab_size_divisible_by=1).padded_vocab_size(2) == 510
    assert type(llama).from_dict(json.loads(json.dumps(llama.to_dict()))) == llama


def test_padded_vocab_size():
    assert padded_vocab_size(509, 2, 128) == 512
    assert padded_vocab_size(151936, 1, 128) == 151936
    assert padded_vocab_size(151936, 2, 128) == 152064
    assert padded_vocab_size(100, 4, 1) == 100
    assert padded_vocab_size(101, 4, 1) == 104


def test_transformer_config_fields(models):
    info = load_model_info(models["qwen3"])
    cfg = transformer_config(info, tp=2, pp=2, dtype="bfloat16", recompute="full")
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.qk_layernorm, cfg.add_qkv_bias) == (32, 2, True, False)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == info.rms_norm_eps and cfg.gated_linear_unit
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16 and not cfg.fp16
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    q2 = transformer_config(load_model_info(models["qwen2"]), recompute="selective")
    assert q2.add_qkv_bias and q2.recompute_granularity == "selective" and q2.params_dtype == torch.float32


def test_llama3_rope_matches_hf_inv_freq(models):
    """megatron's RotaryEmbedding with our kwargs reproduces HF's llama3-scaled frequencies."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megatron_grpo.models.provider import _rope_scaling_kwargs

    info = load_model_info(models["llama"])
    kw = _rope_scaling_kwargs(info.rope_scaling)
    assert kw == {"rope_scaling": True, "rope_scaling_factor": 8.0}
    ours = RotaryEmbedding(kv_channels=info.head_dim, rotary_percent=1.0, rotary_base=info.rope_theta,
                           use_cpu_initialization=True, **kw).inv_freq
    hf = LlamaRotaryEmbedding(AutoConfig.from_pretrained(models["llama"])).inv_freq
    plain = 1.0 / info.rope_theta ** (torch.arange(0, info.head_dim, 2, dtype=torch.float32) / info.head_dim)
    assert not torch.allclose(hf, plain)  # scaling changes some frequencies...
    torch.testing.assert_close(ours, hf.float(), rtol=1e-6, atol=0)  # ...and we reproduce them


def test_bad_inputs_are_one_line_errors(models, tmp_path):
    with pytest.raises(ModelDirError, match="model directory not found") as e:
        load_model_info(tmp_path / "nope")
    assert isinstance(e.value, ValueError) and isinstance(e.value, OSError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model_info(tmp_path / "empty")
    mistral = _edit_config(models["qwen2"], tmp_path / "mistral", architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ModelConfigError) as e:
        load_model_info(mistral)
    msg = str(e.value)
    assert "MistralForCausalLM" in msg and all(a in msg for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"))
    info = load_model_info(models["qwen3"])  # 8 heads, 2 kv heads
    with pytest.raises(ModelConfigError, match="does not divide num_key_value_heads=2"):
        check_parallel(info, tp=4, pp=1)
    with pytest.raises(ModelConfigError, match="does not divide num_attention_heads=8"):
        transformer_config(info, tp=3)
    with pytest.raises(ModelConfigError, match="pipeline parallel size 4 does not divide num_hidden_layers=2"):
        transformer_config(info, pp=4)
    # the local spec supports sequence parallelism (models/norms.py; tests/test_sequence_parallel.py)
    assert transformer_config(info, tp=2, sequence_parallel=True, te=False).sequence_parallel
    with pytest.raises(ModelConfigError, match="recompute"):
        transformer_config(info, recompute="everything")
    gelu = _edit_config(models["qwen2"], tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(ModelConfigError, match="hidden_act='gelu'"):
        load_model_info(gelu)
    yarn = _edit_config(models["llama"], tmp_path / "yarn", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096})
    with pytest.raises(ModelConfigError, match="rope scaling type 'yarn' is not supported"):
        load_model_info(yarn)
    odd = _edit_config(models["llama"], tmp_path / "odd", rope_parameters={**LLAMA3_ROPE, "low_freq_factor": 2.0})
    with pytest.raises(ModelConfigError, match="low_freq_factor=2.0"):
        load_model_info(odd)
