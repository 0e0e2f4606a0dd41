"""Rank bodies for the MoE tests: HF parity at (TP, EP, PP) layouts, the conversion tools at EP>1, and
EP gradients equal to single-process autograd.

One launch checks several layouts (megatron's parallel state is rebuilt in-process between them):
launches cost 20-40 s on 2 cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.dist.models_bodies import _tool, compare_hf_folders, megatron_full_logits

MOE_SPECS = {  # qwen3_moe: every layer sparse, vocab padded; qwen2_moe: shared expert + a dense layer 1
    "qwen3_moe": dict(arch="qwen3_moe", num_layers=2, vocab_size=509, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=128),
    "qwen2_moe": dict(arch="qwen2_moe", num_layers=2, vocab_size=512, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=128, mlp_only_layers=(1,), shared_expert_intermediate_size=256),
}


def make_moe_models(root, archs=("qwen3_moe", "qwen2_moe"), seed: int = 0) -> dict[str, str]:
    """Tiny MoE folders with every tensor re-drawn (see models_fixtures): routing and logits are O(1)."""
    from safetensors.torch import load_file, save_file

    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model
    from tests.dist.models_fixtures import _redraw

    out = {}
    for k, arch in enumerate(archs):
        d = Path(root) / arch
        make_tiny_model(d, TinyModelSpec(**MOE_SPECS[arch], seed=seed + k), overwrite=True)
        gen = torch.Generator().manual_seed(2000 + seed + k)
        tensors = {n: _redraw(n, t, gen).contiguous() for n, t in sorted(load_file(str(d / "model.safetensors")).items())}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        out[arch] = str(d)
    return out


def _reinit(tp: int, ep: int, pp: int):
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(tp=tp, pp=pp, ep=ep, seed=1234)
    return current_layout()


def _build(model_dir, *, load=True, info=None, sequence_parallel=False):
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config

    info = info or load_model_info(model_dir)
    config = transformer_config(info, tp=ps.get_tensor_model_parallel_world_size(),
                                pp=ps.get_pipeline_model_parallel_world_size(), perform_initialization=False,
                                sequence_parallel=sequence_parallel)
    model = build_gpt_model(info, config)
    if load:
        with torch.no_grad():
            for p in model.parameters():  # anything the loader misses poisons the logits
                p.fill_(float("nan"))
        load_hf_weights(model, model_dir, info)
    return model, info


_HF_REF: dict = {}


def _hf_logits(model_dir, tokens):
    if model_dir not in _HF_REF:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            _HF_REF[model_dir] = hf(tokens).logits.float()
    return _HF_REF[model_dir]


def _parity(models: dict) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_grpo.models.logprobs import compute_logprobs

    out = {}
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(11))
    for arch, d in models.items():
        model, info = _build(d)
        model.eval()
        ref = _hf_logits(d, tokens)
        logits = megatron_full_logits(model, tokens)
        with torch.no_grad():
            lp = compute_logprobs([model], tokens, vocab_size=info.vocab_size, temperature=0.7)
        ref_lp = torch.log_softmax(ref[:, :-1] / 0.7, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        r = {"logprob_max_abs_err": float((lp[:, 1:] - ref_lp).abs().max()),
             "local_experts": sum(1 for n, _ in model.named_parameters() if "local_experts" in n and "fc1" in n),
             "ep_rank": ps.get_expert_model_parallel_rank()}
        if logits is not None:
            r.update(max_abs_err=float((logits[..., : info.vocab_size] - ref).abs().max()), ref_std=float(ref.std()),
                     finite=bool(torch.isfinite(logits).all()))
        out[arch] = r
        del model
    return out


def _roundtrip(models: dict, tp: int, ep: int, pp: int, workdir: str, export_at: tuple | None) -> dict:
    imp, exp = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    work = Path(workdir)
    out = {}
    for arch, d in models.items():
        tag = f"{arch}-tp{tp}ep{ep}pp{pp}"
        ckpt, hf_out = work / f"ckpt-{tag}", work / f"hf-{tag}"
        rc_imp = imp.main(["--hf", d, "--out", str(ckpt), "--tp", str(tp), "--pp", str(pp), "--ep", str(ep)])
        rc_exp = exp.main(["--ckpt", str(ckpt), "--out", str(hf_out), "--max-shard-size", "1MB"])
        r = {"rc": [rc_imp, rc_exp]}
        if dist.get_rank() == 0:
            r["compare"] = compare_hf_folders(d, hf_out)
            r["meta_ep"] = json.loads((ckpt / "megatron_grpo.json").read_text()).get("ep")
        if export_at is not None:  # the same checkpoint exported at another (tp, ep, pp): re-sharded experts
            ttp, tep, tpp = export_at
            re_out = work / f"hf-{tag}-at-tp{ttp}ep{tep}pp{tpp}"
            r["reshard_rc"] = exp.main(["--ckpt", str(ckpt), "--out", str(re_out), "--tp", str(ttp),
                                        "--pp", str(tpp), "--ep", str(tep)])
            if dist.get_rank() == 0:
                r["reshard_compare"] = compare_hf_folders(d, re_out)
        out[arch] = r
    return out


def _gather_all(chunks, info, *, grads=False) -> dict:
    """{global name: full tensor} of params or DDP main grads, TP-gathered, united over all ranks."""
    from megatron_grpo.models import moe
    from megatron_grpo.models.hf_mapping import tp_gather
    from megatron_grpo.models.loader import named_global_parameters
    from megatron.core import parallel_state as ps

    local = {}
    for name, p in named_global_parameters(chunks):
        t = (p.main_grad if grads else p).detach().float().contiguous()
        _, tp, _ = moe.shard_position(name)
        if tp > 1:
            group = (ps.get_expert_tensor_parallel_group() if moe.is_expert_param(name)
                     else ps.get_tensor_model_parallel_group())
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t, group=group)
            t = tp_gather(name, shards, info)
        local[name] = t.cpu()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    full = {}
    for d in every:
        full.update(d)
    return full


def _grad_parity(model_dir: str, ep: int, tol: float) -> dict:
    """GRPO gradients at EP=ep (DP shards, 1-4 micro-batches) == plain autograd over the whole batch at EP=1."""
    import dataclasses

    from megatron_grpo.algorithms import grpo_loss, loss_normalizer
    from megatron_grpo.models.loader import named_global_parameters
    from megatron_grpo.models.logprobs import naive_logprobs
    from megatron_grpo.models.provider import load_model_info
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training
    from tests.dist import training_helpers as H

    # aux loss off: megatron's load-balancing loss is per micro-batch (non-linear in the batch), so the
    # full-batch reference would differ by design; the token loss is what must be layout-independent.
    info = dataclasses.replace(load_model_info(model_dir), moe_aux_loss_coeff=0.0)
    temperature, mode = 0.8, "token-mean"
    loss_kwargs = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.0, eps_low=0.2, eps_high=0.28, agg_mode=mode)
    batch = H.fixed_batch(info.vocab_size, 8)
    _reinit(1, 1, 1)
    model, _ = _build(model_dir, info=info)
    named = list(named_global_parameters(model))
    pos = torch.arange(H.SEQ)[None].expand(batch.batch_size, H.SEQ)

    def ref_pass():
        logits = model(input_ids=batch.input_ids, position_ids=pos, attention_mask=None)
        lp = naive_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature=temperature, vocab_size=info.vocab_size)
        return torch.cat([torch.zeros(batch.batch_size, 1), lp], 1)

    with torch.no_grad():
        lp0 = ref_pass()
    g = torch.Generator().manual_seed(5)
    m = batch.completion_mask
    batch.old_logprobs = (lp0 + 0.25 * torch.randn(lp0.shape, generator=g)) * m
    batch.ref_logprobs = (lp0 + 0.1 * torch.randn(lp0.shape, generator=g)) * m
    lp = ref_pass()
    loss, _ = grpo_loss(lp, batch.old_logprobs, batch.advantages, m, normalizer=loss_normalizer(m, mode),
                        ref_logprobs=batch.ref_logprobs, **loss_kwargs)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    ref = {n: gr.detach().clone() for (n, _), gr in zip(named, grads)}
    del model

    layout = _reinit(1, ep, 1)
    model, _ = _build(model_dir, info=info)
    ddp = wrap_model_for_training([model])
    opt = build_optimizer(ddp, lr=1e-3, clip_grad=0.0)
    shard = batch.shard_for_dp(layout.dp_rank, layout.dp)
    report = {"dp": layout.dp, "grad_err": {}, "loss_err": {}, "expert_grad_max": 0.0}
    for mbs in (4, 2, 1, 3):  # 1, 2, 4 and an uneven 2 micro-batches per DP shard of 4 rows
        step = GRPOTrainStep(ddp, opt, micro_batch_size=mbs, temperature=temperature, vocab_size=info.vocab_size,
                             loss=loss_kwargs)
        metrics = step.compute_gradients(shard)
        got = _gather_all(ddp, info, grads=True)
        assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:4]
        report["grad_err"][f"mbs{mbs}"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        report["loss_err"][f"mbs{mbs}"] = abs(metrics["loss"] - float(loss))
        report["expert_grad_max"] = max(float(v.abs().max()) for k, v in ref.items() if "local_experts" in k)
    return report


def moe_layouts(models: dict, layouts: list, workdir: str, roundtrip: dict | None = None,
                grad_model: str | None = None, grad_ep: int = 2, tol: float = 1e-6) -> dict:
    """Parity at each (tp, ep, pp) of ``layouts``; tool round trips for the layouts keyed in ``roundtrip``
    (value: a layout to export the same checkpoint at, or None); EP gradients when ``grad_model``."""
    from megatron_grpo.distributed.init import destroy_distributed

    result = {"rank": None, "parity": {}, "roundtrip": {}}
    for tp, ep, pp in layouts:
        layout = _reinit(tp, ep, pp)
        result["rank"] = layout.rank
        key = f"tp{tp}ep{ep}pp{pp}"
        result["parity"][key] = {"last_stage": layout.is_last_stage, **_parity(models)}
        if roundtrip and key in roundtrip:
            result["roundtrip"][key] = _roundtrip(models, tp, ep, pp, workdir, roundtrip[key])
    if grad_model is not None:
        result["grads"] = _grad_parity(grad_model, grad_ep, tol)
    destroy_distributed()
    return result


def bridge_parity(model_dir: str, tp: int = 1, ep: int = 2, steps: int = 3, doctor_prompts: int = 2) -> dict:
    """Megatron (TP x EP) -> a colocated vLLM engine per rank: step-0 parity, real optimizer steps, the
    skipped sync is visible, one sync restores parity (fp32), rollout logprobs match; then the doctor's
    own check (``check_logprob_parity``) on the synced MoE policy."""
    from megatron_grpo.bridge import WeightBridge
    from megatron_grpo.bridge.doctor import check_logprob_parity
    from megatron_grpo.bridge.policy import build_policy
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig, SamplingConfig
    from tests.dist.bridge_bodies import _max_err, _megatron_logprobs, _train_steps

    init_distributed(tp=tp, pp=1, ep=ep, seed=1234)
    seqs = torch.randint(0, 440, (3, 20), generator=torch.Generator().manual_seed(5)).tolist()
    engine = ColocatedEngine(EngineConfig(model=model_dir, tensor_parallel_size=1, max_model_len=128,
                                          kv_cache_memory_bytes=16 << 20))
    model, info = build_policy(model_dir)
    r = {"step0": _max_err(_megatron_logprobs(model, info, seqs), engine.score(seqs))}
    _train_steps(model, info, steps, lr=3e-3)
    meg = _megatron_logprobs(model, info, seqs)
    r["skipped_sync"] = _max_err(meg, engine.score(seqs))
    bridge = WeightBridge([model], engine, info, bucket_mb=0.25)
    stats = bridge.sync()
    r["synced"] = _max_err(meg, engine.score(seqs))
    r["not_loaded"] = engine.last_not_loaded
    r["buckets"] = stats.buckets
    r["expert_entries"] = sum(1 for e in bridge.entries_by_name.values() if e.ep_owner >= 0)
    r["local_expert_params"] = sum(1 for n, _ in model.named_parameters() if "local_experts" in n)
    batch = engine.generate([s[:6] for s in seqs[:2]], SamplingConfig(n=2, temperature=0.7, max_tokens=8), seed=1)
    full = [p + c for p, c in zip(batch.prompt_token_ids, batch.completion_token_ids)]
    width = max(map(len, full))
    ids = torch.tensor([f + [0] * (width - len(f)) for f in full])
    lp = compute_logprobs([model], ids, temperature=0.7, vocab_size=info.vocab_size)
    r["rollout_logprob_err"] = max(_max_err(lp[i, len(p):len(p) + len(c)], batch.rollout_logprobs[i])
                                   for i, (p, c) in enumerate(zip(batch.prompt_token_ids, batch.completion_token_ids)))
    rep = check_logprob_parity([model], engine, info, [s[:6] for s in seqs[:doctor_prompts]],
                               sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=8), tolerance=1e-5)
    r["doctor_ok"], r["doctor_max"] = rep["ok"], rep["megatron_vs_vllm"]["max"]
    return r
