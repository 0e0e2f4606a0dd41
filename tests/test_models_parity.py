"""Megatron logits == HF transformers logits, and HF -> Megatron -> HF through the tools is bit-exact.

One torchrun launch per (TP, PP) checks all three architectures; the (2,2) and (1,1) launches also
run both conversion tools in-process (their real code paths) and the loader's refusals.
"""
from pathlib import Path

import pytest
import torch

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.models_fixtures import make_test_models

ARCHS = ("llama", "qwen2", "qwen3")
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_test_models(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def run22(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("tp2pp2")
    return run_distributed("tests.dist.models_bodies:parity_and_roundtrip", 4, warm=True, workdir=work,
                           kwargs={"tp": 2, "pp": 2, "models": models, "workdir": str(work)})


@pytest.fixture(scope="module")
def run11(models, run22, tmp_path_factory):
    work = tmp_path_factory.mktemp("tp1pp1")
    ckpts = {arch: run22[0]["roundtrip"][arch]["ckpt"] for arch in ARCHS}
    return run_distributed("tests.dist.models_bodies:parity_and_roundtrip", 1, warm=True, workdir=work,
                           kwargs={"tp": 1, "pp": 1, "models": models, "workdir": str(work),
                                   "reshard_from": ckpts, "error_cases": True})


def _check_parity(results, tp, pp):
    last = [r for r in results if r["last_stage"]]
    assert len(last) == tp  # every TP rank of the last stage compared
    for r in last:
        for arch in ARCHS:
            p = r["parity"][arch]
            assert p["finite"], (arch, "a parameter was not loaded (NaN-poisoned)")
            assert p["logits_shape"] == [2, 32, p["padded_vocab"]]
            assert p["ref_std"] > 0.5  # logits are O(1): the tolerance is meaningful
            assert p["max_abs_err"] <= TOL, (arch, tp, pp, p["max_abs_err"])
            assert p["padded_max_abs"] == 0.0  # padded vocab rows are zero (consumers mask them to -inf)
    for r in results:  # logprobs through compute_logprobs, returned on every rank, vs HF log_softmax (T=0.7)
        for arch in ARCHS:
            assert r["parity"][arch]["logprob_max_abs_err"] <= TOL, (arch, tp, pp, r["parity"][arch])
    for r in results:  # each rank read only its slices: ~1/(tp*pp) of the files, plus replicated norms
        for arch in ARCHS:
            p = r["parity"][arch]
            assert p["bytes_read"] <= p["hf_bytes"] * (1.02 / (tp * pp) + 0.25 * (pp > 1)), (arch, r["rank"], p)
    return {arch: max(r["parity"][arch]["max_abs_err"] for r in last) for arch in ARCHS}


def test_parity_tp1pp1(run11):
    _check_parity(run11, 1, 1)


def test_parity_tp2pp2(run22):
    _check_parity(run22, 2, 2)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parity(models, tp, pp, tmp_path):
    results = run_distributed("tests.dist.models_bodies:parity_and_roundtrip", tp * pp, warm=True, workdir=tmp_path,
                              kwargs={"tp": tp, "pp": pp, "models": models})
    _check_parity(results, tp, pp)


def _check_roundtrip(rt: dict, key: str = "compare"):
    for arch in ARCHS:
        cmp = rt[arch][key]
        assert cmp["tensors"] > 0
        assert cmp["missing"] == [] and cmp["extra"] == [] and cmp["different"] == [], (arch, cmp)


def test_tools_roundtrip_tp2pp2_bit_exact(run22):
    rank0 = run22[0]
    for r in run22:
        for arch in ARCHS:
            assert r["roundtrip"][arch]["rc"] == [0, 0]
    _check_roundtrip(rank0["roundtrip"])
    # --max-shard-size 1MB made the exporter write several shards + an index
    assert "model.safetensors.index.json" in rank0["roundtrip"]["qwen3"]["files"]
    assert "tokenizer.json" in rank0["roundtrip"]["llama"]["files"]


def test_tools_roundtrip_tp1_and_reshard_bit_exact(run11):
    rt = run11[0]["roundtrip"]
    for arch in ARCHS:
        assert rt[arch]["rc"] == [0, 0] and rt[arch]["reshard_rc"] == 0
    _check_roundtrip(rt)
    _check_roundtrip(rt, "reshard_compare")  # TP2xPP2 checkpoint exported at TP1 (dist_checkpointing re-shards)


def test_loader_errors_name_the_tensor(run11):
    errors = run11[0]["errors"]
    assert errors["missing"].startswith("WeightLoadError") and "model.layers.1.mlp.up_proj.weight" in errors["missing"]
    assert "not found" in errors["missing"]
    shape = errors["shape"]
    assert "model.layers.0.self_attn.k_proj.weight" in shape and "(256, 256)" in shape and "(128, 256)" in shape
    assert "model.safetensors" in shape  # names the file
    assert "padded vocab" in errors["padded_vocab"] and "512" in errors["padded_vocab"]
    for msg in errors.values():
        assert "\n" not in msg


def test_exported_folder_loads_in_transformers(models, run22):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    for arch in ARCHS:
        out = run22[0]["roundtrip"][arch]["hf_out"]
        a = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(a) is type(b)
        assert b.config.tie_word_embeddings == a.config.tie_word_embeddings
        with torch.no_grad():
            assert torch.equal(a(tokens).logits, b(tokens).logits), arch
        tok = AutoTokenizer.from_pretrained(out)
        assert tok.chat_template and tok.eos_token == "<|im_end|>"
        assert (Path(out) / "generation_config.json").is_file()
