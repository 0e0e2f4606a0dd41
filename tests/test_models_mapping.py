"""The HF <-> Megatron mapping on its own (no torchrun): layouts, TP rules, names, refusals."""
import pytest
import torch

from megatron_grpo.models import hf_mapping as hm
from megatron_grpo.models.provider import ModelInfo


def _info(**kw) -> ModelInfo:
    base = dict(arch="qwen2", hf_architecture="Qwen2ForCausalLM", vocab_size=509, hidden_size=32,
                ffn_hidden_size=48, num_layers=3, num_attention_heads=8, num_query_groups=2, head_dim=4,
                rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=False,
                qkv_bias=True, qk_layernorm=False)
    base.update(kw)
    return ModelInfo(**base)


def _hf_tensors(info: ModelInfo, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in hm.hf_param_shapes(info).items()}


def test_qkv_interleave_order_per_group():
    info = _info(num_attention_heads=6, num_query_groups=2, head_dim=1, hidden_size=1)
    # label rows: q head h -> 100+h, k group g -> 200+g, v group g -> 300+g
    q = torch.tensor([[100.0 + h] for h in range(6)])
    k = torch.tensor([[200.0], [201.0]])
    v = torch.tensor([[300.0], [301.0]])
    fused = hm.fuse_qkv(q, k, v, num_query_groups=2)
    assert fused.flatten().tolist() == [100, 101, 102, 200, 300, 103, 104, 105, 201, 301]
    back = hm.split_qkv(fused, num_query_groups=2, num_attention_heads=6, head_dim=1)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    # bias (1-D) uses the same order
    fb = hm.fuse_qkv(q.flatten(), k.flatten(), v.flatten(), num_query_groups=2)
    assert torch.equal(fb, fused.flatten())


@pytest.mark.parametrize("heads,groups,head_dim", [(8, 2, 4), (8, 8, 4), (4, 1, 8), (12, 4, 2)])
def test_qkv_round_trip_gqa(heads, groups, head_dim):
    H = 16
    q, k, v = torch.randn(heads * head_dim, H), torch.randn(groups * head_dim, H), torch.randn(groups * head_dim, H)
    fused = hm.fuse_qkv(q, k, v, num_query_groups=groups)
    assert fused.shape == ((heads + 2 * groups) * head_dim, H)
    for a, b in zip(hm.split_qkv(fused, num_query_groups=groups, num_attention_heads=heads, head_dim=head_dim), (q, k, v)):
        assert torch.equal(a, b)


def test_gate_up_round_trip():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = hm.fuse_fc1(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = hm.split_fc1(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("te_names", [False, True])
def test_hf_megatron_hf_round_trip_and_tp(tp, te_names):
    for info in (_info(), _info(arch="qwen3", qkv_bias=False, qk_layernorm=True),
                 _info(arch="llama", qkv_bias=False, tie_word_embeddings=True, vocab_size=512)):
        hf = _hf_tensors(info)
        padded = info.padded_vocab_size(tp)
        back = {}
        for name, full in hm.hf_to_megatron(info, hf, padded_vocab_size=padded, te_names=te_names):
            assert tuple(full.shape) == hm.megatron_full_shape(info, name, padded_vocab_size=padded)
            shards = [hm.tp_shard(name, full, r, tp, info) for r in range(tp)]
            assert torch.equal(hm.tp_gather(name, shards, info), full)
            for r, shard in enumerate(shards):  # the slice-read path builds the same shard
                plan = hm.hf_slice_for(info, name, tp_rank=r, tp_size=tp, padded_vocab_size=padded)
                pieces = [hf[p.hf_name] if p.dim is None else hf[p.hf_name].narrow(p.dim, p.start, p.stop - p.start)
                          for p in plan.parts]
                assert torch.equal(plan.assemble(pieces), shard), (name, r)
            for hf_name, t in hm.megatron_to_hf(info, name, full):
                assert hf_name not in back
                back[hf_name] = t
        assert back.keys() == hf.keys()
        assert all(torch.equal(back[n], hf[n]) for n in hf)
        if info.tie_word_embeddings:
            assert "lm_head.weight" not in back
            assert hm.megatron_to_hf(info, "output_layer.weight", torch.zeros(padded, info.hidden_size)) == []


def test_tp_shard_rules():
    info = _info(num_attention_heads=8, num_query_groups=4, head_dim=2, hidden_size=8, ffn_hidden_size=6)
    fc1 = hm.fuse_fc1(torch.arange(6.0)[:, None], 100 + torch.arange(6.0)[:, None])
    s1 = hm.tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2, info)
    assert s1.flatten().tolist() == [3, 4, 5, 103, 104, 105]  # cat([gate shard, up shard])
    proj = torch.arange(16.0).reshape(2, 8)
    assert torch.equal(hm.tp_shard("decoder.layers.0.self_attention.linear_proj.weight", proj, 1, 2, info), proj[:, 4:])
    norm = torch.randn(8)
    assert hm.tp_shard("decoder.layers.2.input_layernorm.weight", norm, 1, 4, info) is norm
    # qkv: rank r holds whole query groups -> its q heads with their own k/v
    q, k, v = torch.arange(16.0)[:, None], 100 + torch.arange(8.0)[:, None], 200 + torch.arange(8.0)[:, None]
    shard = hm.tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", hm.fuse_qkv(q, k, v, num_query_groups=4), 1, 2, info)
    qs, ks, vs = hm.split_qkv(shard, num_query_groups=2, num_attention_heads=4, head_dim=2)
    assert torch.equal(qs, q[8:]) and torch.equal(ks, k[4:]) and torch.equal(vs, v[4:])


def test_vocab_padding_rows_and_slices():
    info = _info(vocab_size=509)
    emb = torch.randn(509, 32)
    (name, full), = [(n, t) for n, t in hm.hf_to_megatron(info, {**_hf_tensors(info), "model.embed_tokens.weight": emb},
                                                          padded_vocab_size=768) if n.startswith("embedding")]
    assert full.shape == (768, 32) and torch.equal(full[:509], emb) and not full[509:].any()
    plan = hm.hf_slice_for(info, name, tp_rank=2, tp_size=3, padded_vocab_size=768)  # rows 512..767: all padding
    assert plan.parts[0].start == plan.parts[0].stop == 509 and plan.pad_rows == 256
    assert hm.megatron_to_hf(info, name, full)[0][1].shape == (509, 32)


def test_kv_heads_below_tp_is_a_clear_error():
    info = _info(num_attention_heads=8, num_query_groups=2)
    full = torch.randn((8 + 4) * 4, 32)
    with pytest.raises(hm.WeightMappingError, match=r"num_key_value_heads=2 is not divisible by tensor parallel size 4"):
        hm.tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", full, 0, 4, info)
    with pytest.raises(hm.WeightMappingError, match="num_key_value_heads=2"):
        hm.hf_slice_for(info, "decoder.layers.0.self_attention.linear_qkv.bias", tp_rank=0, tp_size=4)


def test_refusals_are_one_line():
    info = _info(arch="llama", qkv_bias=False)
    cases = [
        lambda: hm.megatron_to_hf(info, "decoder.layers.0.self_attention.linear_qkv.bias", torch.zeros(48)),
        lambda: hm.megatron_to_hf(info, "decoder.layers.0.self_attention.q_layernorm.weight", torch.zeros(4)),
        lambda: hm.megatron_to_hf(info, "decoder.layers.0.mlp.router.weight", torch.zeros(4)),
        lambda: hm.megatron_to_hf(info, "decoder.layers.7.mlp.linear_fc2.weight", torch.zeros(32, 48)),
        # a TP shard passed where a full tensor is expected
        lambda: hm.megatron_to_hf(info, "decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(32, 24)),
        lambda: list(hm.hf_to_megatron(info, {})),
    ]
    for case in cases:
        with pytest.raises(hm.WeightMappingError) as e:
            case()
        assert "\n" not in str(e.value)
    with pytest.raises(hm.WeightMappingError, match=r"expected a full \(TP-gathered\) tensor of shape \(32, 48\), got \(32, 24\)"):
        cases[4]()


def test_names_pp_offsets_and_extra_state():
    assert hm.canonical_name("module.module.decoder.layers.1.mlp.linear_fc1.weight") == "decoder.layers.1.mlp.linear_fc1.weight"
    g = hm.local_to_global_name("module.decoder.layers.1.self_attention.linear_qkv.weight", 4)
    assert g == "decoder.layers.5.self_attention.linear_qkv.weight"
    assert hm.global_to_local_name(g, 4, 2) == "decoder.layers.1.self_attention.linear_qkv.weight"
    assert hm.global_to_local_name(g, 0, 4) is None
    assert hm.local_to_global_name("embedding.word_embeddings.weight", 4) == "embedding.word_embeddings.weight"
    assert hm.is_extra_state("decoder.layers.0.self_attention.linear_qkv._extra_state")
    assert hm.megatron_to_hf(_info(), "decoder.layers.0.self_attention.linear_proj._extra_state", torch.zeros(0)) == []
    te = hm.megatron_to_hf(_info(), "decoder.layers.2.mlp.linear_fc1.layer_norm_weight", torch.ones(32))
    assert [n for n, _ in te] == ["model.layers.2.post_attention_layernorm.weight"]


def test_layer_offsets_use_megatrons_rule():
    from megatron_grpo.models.provider import transformer_config

    info = _info(num_layers=6, num_attention_heads=8, num_query_groups=2)
    cfg = transformer_config(info, pp=3)
    assert [hm.layer_offset(cfg, pp_rank=r) for r in range(3)] == [0, 2, 4]
    assert [hm.num_stage_layers(cfg, pp_rank=r) for r in range(3)] == [2, 2, 2]
    uneven = transformer_config(info, pp=2, num_layers_in_first_pipeline_stage=2)
    assert [hm.layer_offset(uneven, pp_rank=r) for r in range(2)] == [0, 2]
    assert [hm.num_stage_layers(uneven, pp_rank=r) for r in range(2)] == [2, 4]
