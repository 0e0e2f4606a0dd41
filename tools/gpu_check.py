#!/usr/bin/env python
"""The prepared check for a single CUDA GPU (run by tools/gpu_check.sh; see tools/README.md).

One process, world size 1, bf16, megatron-core's local layer spec when TransformerEngine is absent.
Each measurement runs on its own and records its result or its error, so one failure still leaves
the others' numbers; everything goes to ONE JSON report (``--out``):

* ``platform``: GPU, torch/CUDA/megatron-core versions, TE/apex, and that the CPU compatibility layer
  stayed inactive;
* ``parity``: bf16 Megatron vs HF logits/logprobs on a ~100M Qwen2-style model (same weights);
* ``logprobs``: our vocab-parallel chunked logprob kernel vs naive fp32 ``log_softmax`` + gather at
  V=152064 (forward + backward): time, peak extra memory, achieved HBM bandwidth of the minimal traffic
  (read the logits once, write their gradient once);
* ``train_step``: one GRPO optimizer step of a ~1B random model (bf16 params, fp32 main params/grads,
  Adam): time and MFU against the GPU's dense bf16 peak (``--peak-tflops``; H200/H100 SXM: 989);
* ``dist_checkpoint``: dist_checkpointing save + load of the ~100M model, bit-exact, with times.

``--tiny`` runs every step at toy sizes on whatever device there is (the CPU dry run of CI machines).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a checkout without install

SIZES = {  # (parity/ckpt model, logprob tokens x vocab, train model, train batch rows x seq)
    "full": dict(parity=dict(hidden_size=768, intermediate_size=2048, num_layers=10, num_attention_heads=12,
                             num_key_value_heads=4, head_dim=64, vocab_size=32768),
                 lp_tokens=8192, lp_vocab=152064,
                 train=dict(hidden_size=2048, intermediate_size=5632, num_layers=16, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=32768),
                 train_rows=8, train_seq=2048),
    "tiny": dict(parity=dict(hidden_size=128, intermediate_size=256, num_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, vocab_size=512),
                 lp_tokens=64, lp_vocab=1520,
                 train=dict(hidden_size=128, intermediate_size=256, num_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, vocab_size=512),
                 train_rows=4, train_seq=32),
}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak(base):
    import torch

    return torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else None


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _megatron_model(model_dir, dtype, *, load=True):
    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config

    info = load_model_info(model_dir)
    model = build_gpt_model(info, transformer_config(info, tp=1, pp=1, dtype=dtype))
    if torch_cuda():
        model.cuda()
    if load:
        load_hf_weights(model, model_dir, info)
    return model, info


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _config_only_dir(path: Path, spec) -> Path:
    """An HF folder with config.json only (a random model: no 4 GB of HF-initialised weights to write)."""
    from megatron_grpo.models.tiny import hf_config

    path.mkdir(parents=True)
    cfg = hf_config(spec, eos_token_id=0, pad_token_id=0)
    cfg.architectures = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[spec.arch]]
    cfg.save_pretrained(path)
    return path


def check_platform(report: dict) -> None:
    import torch

    from megatron_grpo.platform import cpu_compat_enabled, detect

    plat = detect()
    report["platform"] = {
        "summary": plat.summary(), "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "gpu": torch.cuda.get_device_name() if plat.cuda else None,
        "megatron_core": plat.megatron_core_version, "transformer_engine": plat.transformer_engine,
        "apex": plat.apex, "cpu_compat_active": cpu_compat_enabled(),
        "cpu_compat_inactive_ok": (not cpu_compat_enabled()) if plat.cuda else None,
    }


def check_parity(report: dict, model_dir: Path, batch: int = 4, seq: int = 256) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_grpo.models.logprobs import naive_logprobs

    dev = torch.device("cuda" if torch_cuda() else "cpu")
    model, info = _megatron_model(model_dir, "bfloat16")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (batch, seq), generator=g).to(dev)
    with torch.no_grad():
        pos = torch.arange(seq, device=dev).unsqueeze(0).expand(batch, seq)
        mg = model(input_ids=ids, position_ids=pos, attention_mask=None).float()[..., : info.vocab_size]
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
        ref = hf(input_ids=ids).logits.float()[..., : info.vocab_size]
        mg_lp = naive_logprobs(mg[:, :-1], ids[:, 1:])
        ref_lp = naive_logprobs(ref[:, :-1], ids[:, 1:])
    report["parity"] = {
        "params": _n_params(model), "tokens": batch * seq, "dtype": "bfloat16",
        "logits_max_abs_diff": float((mg - ref).abs().max()), "logits_mean_abs_diff": float((mg - ref).abs().mean()),
        "logprob_max_abs_diff": float((mg_lp - ref_lp).abs().max()),
        "logprob_mean_abs_diff": float((mg_lp - ref_lp).abs().mean()),
        "argmax_agreement": float((mg.argmax(-1) == ref.argmax(-1)).float().mean()),
    }
    del model, hf


def check_logprobs(report: dict, tokens: int, vocab: int, repeats: int = 5) -> None:
    import torch

    from megatron_grpo.models.logprobs import naive_logprobs, vocab_parallel_logprobs

    dev = torch.device("cuda" if torch_cuda() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    out = {"tokens": tokens, "vocab": vocab, "dtype": "bfloat16"}
    for name in ("chunked", "naive"):
        def run():
            logits = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16).requires_grad_(True)
            base = _peak_reset()
            t0 = time.perf_counter()
            if name == "chunked":
                lp = vocab_parallel_logprobs(logits, targets, inplace_backward=False)
            else:
                lp = naive_logprobs(logits, targets)
            lp.sum().backward()
            _sync()
            return time.perf_counter() - t0, _peak(base), lp.detach()

        run()  # warm-up (allocator, kernels)
        times, peaks = [], []
        for _ in range(repeats):
            t, p, lp = run()
            times.append(t)
            peaks.append(p)
        best = min(times)
        min_bytes = 2 * tokens * vocab * 2  # read bf16 logits once + write their bf16 gradient once
        out[name] = {"seconds": best, "peak_extra_bytes": max(peaks) if peaks[0] is not None else None,
                     "achieved_GBps_of_min_traffic": min_bytes / best / 1e9}
    out["time_ratio_chunked_over_naive"] = out["chunked"]["seconds"] / out["naive"]["seconds"]
    if out["naive"]["peak_extra_bytes"]:
        out["memory_ratio_chunked_over_naive"] = out["chunked"]["peak_extra_bytes"] / out["naive"]["peak_extra_bytes"]
    report["logprobs"] = out


def check_train_step(report: dict, model_dir: Path, rows: int, seq: int, peak_tflops: float) -> None:
    import torch

    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training
    from megatron_grpo.training.batch import GRPOBatch

    model, info = _megatron_model(model_dir, "bfloat16", load=False)
    n = _n_params(model)
    ddp = wrap_model_for_training([model])
    opt = build_optimizer(ddp, lr=1e-5, clip_grad=1.0, bf16=True, params_dtype=torch.bfloat16)
    step = GRPOTrainStep(ddp, opt, micro_batch_size=max(1, rows // 4), vocab_size=info.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (rows, seq), generator=g)
    mask = torch.zeros(rows, seq)
    mask[:, seq // 4:] = 1
    batch = GRPOBatch(input_ids=ids, completion_mask=mask, advantages=torch.randn(rows, generator=g))
    batch.old_logprobs = torch.zeros(rows, seq) - 3.0
    step(batch)  # warm-up
    base = _peak_reset()
    t0 = time.perf_counter()
    m = step(batch)
    _sync()
    dt = time.perf_counter() - t0
    L, h = info.num_layers, info.hidden_size
    flops = 6 * n * rows * seq + 12 * L * h * seq * seq * rows  # dense + attention (fwd+bwd), no recompute
    report["train_step"] = {
        "params": n, "tokens": rows * seq, "seconds": dt, "tflops_achieved": flops / dt / 1e12,
        "mfu": flops / dt / 1e12 / peak_tflops if torch_cuda() else None, "peak_tflops_assumed": peak_tflops,
        "peak_extra_bytes": _peak(base), "loss": m.get("loss"), "skipped": m.get("skipped"),
        "precision": "bf16 params, fp32 main params and grads (Megatron mixed precision optimizer)",
    }


def check_dist_checkpoint(report: dict, model_dir: Path, workdir: Path) -> None:
    import torch

    from megatron_grpo.models.checkpoint_io import load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_grpo.models.loader import named_global_parameters

    model, info = _megatron_model(model_dir, "bfloat16")
    ckpt = workdir / "dist_ckpt"
    ckpt.mkdir()
    _sync()
    t0 = time.perf_counter()
    save_megatron_checkpoint([model], ckpt, info)
    _sync()
    t_save = time.perf_counter() - t0
    fresh, _ = _megatron_model(model_dir, "bfloat16", load=False)
    t0 = time.perf_counter()
    meta = load_megatron_checkpoint([fresh], ckpt)
    _sync()
    t_load = time.perf_counter() - t0
    a, b = dict(named_global_parameters([model])), dict(named_global_parameters([fresh]))
    exact = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    report["dist_checkpoint"] = {"bit_exact": exact, "save_seconds": t_save, "load_seconds": t_load,
                                 "bytes": size, "written_by": meta.get("megatron_core_version")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check/report.json", help="the JSON report")
    p.add_argument("--tiny", action="store_true", help="toy sizes, any device (CPU dry run)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200/H100 SXM: 989)")
    p.add_argument("--only", default="", help="comma-separated subset: parity,logprobs,train_step,dist_checkpoint")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("error: no CUDA device here: tools/gpu_check.py measures a GPU (use --tiny for the CPU dry run)",
              file=sys.stderr)
        return 2
    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    sizes = SIZES["tiny" if args.tiny else "full"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tiny": args.tiny, "errors": {}}
    only = {s for s in args.only.split(",") if s}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        init_distributed(tp=1, pp=1)
        check_platform(report)
        steps = [
            ("parity", lambda: check_parity(report, make_tiny_model(
                work / "m100", TinyModelSpec(arch="qwen2", **sizes["parity"])))),
            ("logprobs", lambda: check_logprobs(report, sizes["lp_tokens"], sizes["lp_vocab"])),
            ("train_step", lambda: check_train_step(report, _config_only_dir(
                work / "m1b", TinyModelSpec(arch="qwen2", **sizes["train"])), sizes["train_rows"],
                sizes["train_seq"], args.peak_tflops)),
            ("dist_checkpoint", lambda: check_dist_checkpoint(report, work / "m100", work)),
        ]
        for name, fn in steps:
            if only and name not in only:
                continue
            t0 = time.monotonic()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                if name == "dist_checkpoint" and not (work / "m100").exists():
                    make_tiny_model(work / "m100", TinyModelSpec(arch="qwen2", **sizes["parity"]))
                fn()
            except Exception as e:  # record and go on: one failure must not hide the other numbers
                report["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            report.setdefault("step_seconds", {})[name] = round(time.monotonic() - t0, 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            out.write_text(json.dumps(report, indent=2) + "\n")  # partial reports survive a timeout
        destroy_distributed()
    report["total_seconds"] = round(time.monotonic() - t_start, 2)
    report["platform"]["cpu_compat_active_at_end"] = __import__("megatron_grpo.platform").platform.cpu_compat_enabled()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"[gpu_check] report: {out}", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
