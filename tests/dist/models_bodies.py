"""Rank bodies for the model tests: HF parity of megatron logits, and the conversion tools' round trip.

One launch per (TP, PP) checks all three architectures (launches cost 10-40 s on 2 cores).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tokens(vocab: int, batch: int = 2, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(11))


def megatron_full_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Forward through megatron's pipeline schedule; on the last stage return [b, s, padded_vocab] (TP-gathered)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        out = model(input_ids=ids, position_ids=torch.arange(s).unsqueeze(0).expand(b, s), attention_mask=None)
        return out, lambda output: (output.sum() * 0.0, {"logits": output.detach()})

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = out[0]["logits"].float().contiguous()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _parity(models: dict, tp: int, pp: int) -> dict:
    from transformers import AutoModelForCausalLM

    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config, uses_transformer_engine

    results = {}
    for arch, d in models.items():
        info = load_model_info(d)
        sp = tp > 1 and arch == "qwen3" and uses_transformer_engine()  # SP needs TE (GPU machines)
        config = transformer_config(info, tp=tp, pp=pp, dtype="float32", sequence_parallel=sp,
                                    perform_initialization=False)
        model = build_gpt_model(info, config)
        model.eval()
        with torch.no_grad():
            for p in model.parameters():  # anything the loader misses poisons the logits
                p.fill_(float("nan"))
        report = load_hf_weights(model, d, info)
        tokens = _tokens(info.vocab_size)
        logits = megatron_full_logits(model, tokens)
        total = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        r = {"bytes_read": report.bytes_read, "hf_bytes": total, "tensors": report.tensors,
             "padded_vocab": info.padded_vocab_size(tp), "sequence_parallel": sp}
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(tokens).logits.float()
        # The production logprob path (vocab-parallel, padded vocab masked, PP broadcast) on every rank,
        # against HF's log_softmax at a sampling temperature.
        from megatron_grpo.models.logprobs import compute_logprobs

        with torch.no_grad():
            lp = compute_logprobs([model], tokens, vocab_size=info.vocab_size, temperature=0.7)
        ref_lp = torch.log_softmax(ref[:, :-1] / 0.7, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        r["logprob_max_abs_err"] = float((lp[:, 1:] - ref_lp).abs().max())
        if logits is not None:
            r["max_abs_err"] = float((logits[..., : info.vocab_size] - ref).abs().max())
            r["padded_max_abs"] = float(logits[..., info.vocab_size:].abs().max()) if logits.shape[-1] > info.vocab_size else 0.0
            r["logits_shape"] = list(logits.shape)
            r["ref_std"] = float(ref.std())
            r["finite"] = bool(torch.isfinite(logits).all())
        results[arch] = r
        del model
    return results


def compare_hf_folders(a, b) -> dict:
    """Every tensor of folder ``a`` vs ``b``: same names, dtypes, shapes and bits (torch.equal)."""
    from megatron_grpo.models.loader import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    na, nb = set(ca.weight_map), set(cb.weight_map)
    bad = []
    for n in sorted(na & nb):
        x, y = ca.get(n), cb.get(n)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            bad.append(n)
    return {"tensors": len(na & nb), "missing": sorted(na - nb), "extra": sorted(nb - na), "different": bad}


def _roundtrip(models: dict, tp: int, pp: int, workdir: str, reshard_from: dict | None) -> dict:
    import torch.distributed as dist

    imp, exp = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    work = Path(workdir)
    out = {}
    for arch, d in models.items():
        ckpt, hf_out = work / f"ckpt-{arch}-tp{tp}pp{pp}", work / f"hf-{arch}-tp{tp}pp{pp}"
        rc_imp = imp.main(["--hf", d, "--out", str(ckpt), "--tp", str(tp), "--pp", str(pp)])
        rc_exp = exp.main(["--ckpt", str(ckpt), "--out", str(hf_out), "--max-shard-size", "1MB"])
        r = {"rc": [rc_imp, rc_exp], "ckpt": str(ckpt), "hf_out": str(hf_out)}
        if dist.get_rank() == 0:
            r["compare"] = compare_hf_folders(d, hf_out)
            r["files"] = sorted(p.name for p in hf_out.iterdir())
        if reshard_from and arch in reshard_from:  # a checkpoint written at another TP/PP, exported here
            re_out = work / f"hf-{arch}-from-{Path(reshard_from[arch]).name}"
            r["reshard_rc"] = exp.main(["--ckpt", reshard_from[arch], "--out", str(re_out),
                                        "--tp", str(tp), "--pp", str(pp)])
            if dist.get_rank() == 0:
                r["reshard_compare"] = compare_hf_folders(d, re_out)
        out[arch] = r
    return out


def _error_cases(models: dict, workdir: str, reshard_from: dict | None) -> dict:
    """Messages of the loader's refusals: a missing tensor, a wrong shape, a padded-vocab mismatch."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_grpo.models.checkpoint_io import load_megatron_checkpoint
    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config

    src = Path(models["qwen2"])
    info = load_model_info(src)
    model = build_gpt_model(info, transformer_config(info, perform_initialization=False))
    out = {}
    for case in ("missing", "shape"):
        d = Path(workdir) / f"bad-{case}"
        shutil.copytree(src, d)
        tensors = load_file(str(d / "model.safetensors"))
        if case == "missing":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:128]
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        try:
            load_hf_weights(model, d, info)
            out[case] = None
        except ValueError as e:
            out[case] = f"{type(e).__name__}: {e}"
    if reshard_from and "qwen2" in reshard_from:  # the checkpoint has 512 rows; build with 1024
        big = build_gpt_model(info, transformer_config(info, perform_initialization=False), padded_vocab_size=1024)
        try:
            load_megatron_checkpoint(big, reshard_from["qwen2"])
            out["padded_vocab"] = None
        except ValueError as e:
            out["padded_vocab"] = f"{type(e).__name__}: {e}"
    return out


def parity_and_roundtrip(tp: int, pp: int, models: dict, workdir: str | None = None,
                         reshard_from: dict | None = None, error_cases: bool = False) -> dict:
    from megatron_grpo.distributed.init import current_layout, destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp, seed=1234)
    layout = current_layout()
    result = {"rank": layout.rank, "tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank,
              "last_stage": layout.is_last_stage, "parity": _parity(models, tp, pp)}
    if error_cases:
        result["errors"] = _error_cases(models, workdir, reshard_from)
    if workdir is not None:
        result["roundtrip"] = _roundtrip(models, tp, pp, workdir, reshard_from)
    destroy_distributed()
    return result
