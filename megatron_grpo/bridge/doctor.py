"""``megatron-grpo doctor``: does vLLM sample from the policy the trainer is training?

Builds the Megatron policy (TP x PP) and the vLLM engine, runs one weight sync through the bridge,
samples completions with vLLM, and compares per-token logprobs of the sampled tokens three ways:
Megatron (recomputed, same temperature), vLLM (``processed_logprobs`` returned with the samples) and,
optionally, Hugging Face transformers (fp32, rank 0). Exits non-zero when any difference exceeds
the tolerance: a wrong qkv split, a stale tied head, a missing sync or a temperature mismatch all
show up as large differences (what veRL/NeMo-RL users chase as "logprob drift").

:func:`check_logprob_parity` is the same check as a function, for the trainer's step 0
(slime-style "recomputed logprobs equal rollout logprobs" assertion).

Usage: ``megatron-grpo doctor --model DIR --tp T --pp P --rollout-tp R``. Without torchrun it
re-launches itself under ``torch.distributed.run`` with lcm(T*P, R) processes.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import torch

from megatron_grpo.distributed.ports import free_port

DEFAULT_QUESTIONS = ["What is 3 + 4?", "What is 7 * 8?", "Name a prime number.", "What is 9 - 5?"]


def _pad(seqs: list[list[int]], value: int = 0) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _hf_logprobs(model_dir: str, seqs: list[list[int]], starts: list[int], temperature: float) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0].float() / temperature
            lp = torch.log_softmax(logits, dim=-1)
            out.append([float(lp[t - 1, seq[t]]) for t in range(start, len(seq))])
    return out


def _stats(a: list[list[float]], b: list[list[float]]) -> dict:
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return {"max": max(diffs) if diffs else 0.0, "mean": sum(diffs) / max(len(diffs), 1), "tokens": len(diffs)}


def check_logprob_parity(model_chunks, engine, info, prompts, *, sampling=None, seed: int = 0,
                         hf_model_dir: str | None = None, tolerance: float = 1e-3) -> dict:
    """Sample with ``engine`` and compare per-token logprobs Megatron vs vLLM (vs HF).

    Collective: every trainer rank calls it with the same ``prompts`` (token-id lists or strings).
    ``hf_model_dir`` adds the transformers comparison; only meaningful while the Megatron weights
    still equal that folder's (step 0). Returns ``{"ok", "tolerance", "megatron_vs_vllm": {max,
    mean, tokens}, ["megatron_vs_hf", "vllm_vs_hf"], "per_token": {...}}`` (same on every rank).
    """
    import torch.distributed as dist

    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.rollout.types import SamplingConfig

    sampling = sampling or SamplingConfig(n=2, temperature=1.0, max_tokens=16)
    batch = engine.generate(prompts, sampling, seed=seed)
    seqs = [p + c for p, c in zip(batch.prompt_token_ids, batch.completion_token_ids)]
    starts = [len(p) for p in batch.prompt_token_ids]
    ids = _pad(seqs)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, seq) in enumerate(zip(starts, seqs)):
        mask[i, s:len(seq)] = True
    lp = compute_logprobs(model_chunks, ids, mask, temperature=sampling.temperature, vocab_size=info.vocab_size)
    meg = [lp[i, s:len(seq)].tolist() for i, (s, seq) in enumerate(zip(starts, seqs))]
    vllm = batch.rollout_logprobs
    report = {"tolerance": tolerance, "temperature": sampling.temperature, "sequences": len(seqs),
              "weight_version": batch.weight_version, "megatron_vs_vllm": _stats(meg, vllm),
              "per_token": {"tokens": [seq[s:] for seq, s in zip(seqs, starts)], "megatron": meg, "vllm": vllm}}
    if hf_model_dir is not None:
        hf = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            hf[0] = _hf_logprobs(hf_model_dir, seqs, starts, sampling.temperature)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(hf, src=0)
        report["per_token"]["hf"] = hf[0]
        report["megatron_vs_hf"] = _stats(meg, hf[0])
        report["vllm_vs_hf"] = _stats(vllm, hf[0])
    report["ok"] = all(v["max"] <= tolerance for k, v in report.items() if k.endswith(("_vllm", "_hf")))
    return report


def _print_report(report: dict, stats, show_tokens: int) -> None:
    if stats is None:
        print("weight sync: SKIPPED (--skip-sync)")
    else:
        print(f"weight sync: {stats.seconds * 1e3:.1f} ms, {stats.buckets} buckets, version {stats.version}")
    pt = report["per_token"]
    has_hf = "hf" in pt
    for i in range(min(2, report["sequences"])):
        print(f"-- sequence {i}: first {show_tokens} completion tokens")
        print(f"{'tok':>6} {'megatron':>11} {'vllm':>11}" + (f" {'hf':>11}" if has_hf else "") + f" {'|meg-vllm|':>11}")
        for t in range(min(show_tokens, len(pt["tokens"][i]))):
            m, v = pt["megatron"][i][t], pt["vllm"][i][t]
            row = f"{pt['tokens'][i][t]:>6} {m:>11.6f} {v:>11.6f}"
            if has_hf:
                row += f" {pt['hf'][i][t]:>11.6f}"
            print(row + f" {abs(m - v):>11.2e}")
    for key in ("megatron_vs_vllm", "megatron_vs_hf", "vllm_vs_hf"):
        if key in report:
            s = report[key]
            flag = "OK" if s["max"] <= report["tolerance"] else "FAIL"
            print(f"{key:<17} max {s['max']:.3e}  mean {s['mean']:.3e}  over {s['tokens']} tokens  [{flag}]")
    print(f"doctor: {'PASS' if report['ok'] else 'FAIL'} (tolerance {report['tolerance']:g}, "
          f"temperature {report['temperature']:g})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-grpo doctor", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="Megatron expert parallel size (MoE models)")
    p.add_argument("--rollout-tp", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--placement", choices=("colocated", "disaggregated"), default="colocated")
    p.add_argument("--transport", choices=("pg", "fs"), default="pg", help="disaggregated weight transport")
    p.add_argument("--weights-path", default=None, help="folder for --transport fs")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32", help="Megatron parameter dtype (vLLM: engine default)")
    p.add_argument("--bucket-mb", type=float, default=256)
    p.add_argument("--perturb", type=int, default=None, metavar="SEED",
                   help="perturb every Megatron weight before the sync (tests the sync; skips HF)")
    p.add_argument("--skip-sync", action="store_true",
                   help="do not sync (with --perturb: shows what a missed sync looks like; must FAIL)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--show-tokens", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM context length (default: min(1024, the model's max_position_embeddings))")
    return p


def _relaunch(args, argv) -> int:
    world = math.lcm(args.tp * args.pp * args.ep, args.rollout_tp if args.placement == "colocated" else 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "megatron_grpo.bridge.doctor", *argv]
    return subprocess.call(cmd)


def default_context_length(model_dir: str, cap: int = 1024) -> int:
    """What the model supports, up to ``cap``: its config.json's max_position_embeddings."""
    import json
    from pathlib import Path

    try:
        limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return cap  # not a readable folder: vLLM says what is wrong with it
    return min(cap, int(limit)) if limit else cap


def doctor_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    world = math.lcm(args.tp * args.pp * args.ep, args.rollout_tp if args.placement == "colocated" else 1)
    if "RANK" not in os.environ and world > 1:
        return _relaunch(args, argv)

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_grpo.bridge.policy import build_policy, perturb_
    from megatron_grpo.bridge.sync import WeightBridge
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import EngineConfig, SamplingConfig

    max_len = args.max_model_len or default_context_length(args.model)
    init_distributed(tp=args.tp, pp=args.pp, seed=args.seed, ep=args.ep)
    rank0 = dist.get_rank() == 0
    cfg = EngineConfig(model=args.model, tensor_parallel_size=args.rollout_tp, max_model_len=max_len,
                       seed=args.seed)
    try:
        if args.placement == "colocated":
            from megatron_grpo.rollout.engine import ColocatedEngine

            engine = ColocatedEngine(cfg)
        else:
            from megatron_grpo.rollout.disaggregated import DisaggregatedEngine

            engine = DisaggregatedEngine(cfg, transport=args.transport, weights_path=args.weights_path)
    except ValueError as e:  # pydantic's refusal spans lines; its first says only "1 validation error for ..."
        raise ValueError(f"vLLM refused the engine for {args.model}: {' '.join(str(e).split())}") from None
    model, info = build_policy(args.model, dtype=args.dtype)
    if args.perturb is not None:
        perturb_(model, args.perturb)
    bridge = WeightBridge([model], engine, info, bucket_mb=args.bucket_mb)
    stats = bridge.sync() if not args.skip_sync else None
    tok = AutoTokenizer.from_pretrained(args.model)
    questions = (DEFAULT_QUESTIONS * (args.num_prompts // len(DEFAULT_QUESTIONS) + 1))[: args.num_prompts]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)) for q in questions]
    sampling = SamplingConfig(n=args.group_size, temperature=args.temperature, max_tokens=args.max_tokens)
    hf_dir = None if (args.no_hf or args.perturb is not None) else args.model
    report = check_logprob_parity([model], engine, info, prompts, sampling=sampling, seed=args.seed,
                                  hf_model_dir=hf_dir, tolerance=args.tolerance)
    if rank0:
        _print_report(report, stats, args.show_tokens)
        sys.stdout.flush()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from megatron_grpo.errors import INPUT_ERRORS, report

    try:
        code = doctor_main()
    except INPUT_ERRORS as e:  # every rank sees the same input: rank 0 says it on one line
        code = report(e)
    sys.stdout.flush()
    os._exit(code)  # skip vLLM/gloo teardown hangs at exit
