#!/usr/bin/env python
"""Convert a Hugging Face Llama/Qwen2/Qwen3 folder into a megatron-core dist_checkpointing checkpoint.

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR                      # TP=1, PP=1
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf DIR --out DIR --tp 2 --pp 2

Each rank reads only the HF slices its TP/PP position holds. The checkpoint can be loaded at any
TP/PP (dist_checkpointing re-shards) and carries the HF config + tokenizer (``hf/``) and
``megatron_grpo.json`` so ``tools/convert_megatron_to_hf.py`` can rebuild a full HF folder.
Refuses to overwrite a non-empty ``--out`` without ``--force``. Exit code 2 on a usage/input error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a checkout without install


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size, MoE models (default 1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="parameter dtype of the checkpoint (auto: the HF config's dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocab to a multiple of this * tp (Megatron's rule; default 128)")
    p.add_argument("--trust-remote-code", action="store_true", help="pass trust_remote_code to AutoConfig")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    return p.parse_args(argv)


def _preflight(args):
    """Checks that need no process group: fail fast, on every rank alike, before any collective."""
    from megatron_grpo.models.checkpoint_io import CheckpointError
    from megatron_grpo.models.loader import HFCheckpoint
    from megatron_grpo.models.moe import check_moe_parallel
    from megatron_grpo.models.provider import check_parallel, load_model_info

    info = load_model_info(args.hf, trust_remote_code=args.trust_remote_code,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    HFCheckpoint(args.hf).close()  # weights present in a readable format
    check_parallel(info, tp=args.tp, pp=args.pp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (args.tp * args.pp):
        raise CheckpointError(f"world size {world} is not divisible by tp*pp = {args.tp}*{args.pp}")
    check_moe_parallel(info, tp=args.tp, ep=args.ep, pp=args.pp, world=world)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CheckpointError(f"{out} exists and is not empty (pass --force to overwrite)")
    return info


def run(args, pre=None) -> dict:
    from megatron_grpo.models.checkpoint_io import (parallel_session, prepare_output_dir, progress_printer,
                                                    save_megatron_checkpoint)
    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.provider import build_gpt_model, transformer_config

    info = pre if pre is not None else _preflight(args)
    started = time.monotonic()
    with parallel_session(tp=args.tp, pp=args.pp, ep=args.ep) as layout:
        out = prepare_output_dir(args.out, force=args.force, protect=(args.hf,))
        dtype = info.dtype if args.dtype == "auto" else args.dtype
        config = transformer_config(info, tp=args.tp, pp=args.pp, dtype=dtype, perform_initialization=False,
                                    ep=args.ep)
        model = build_gpt_model(info, config)
        report = load_hf_weights(model, args.hf, info, progress=progress_printer("load"))
        if layout.rank == 0:
            print(f"[save] writing dist checkpoint to {out}", flush=True)
        save_megatron_checkpoint(model, out, info, hf_dir=args.hf,
                                 extra_meta={"source": str(Path(args.hf).resolve()), "created_by": "convert_hf_to_megatron"})
        summary = {"out": str(out), "tp": args.tp, "pp": args.pp, "ep": args.ep, "dtype": dtype,
                   "padded_vocab_size": info.padded_vocab_size(args.tp), "rank0_tensors": report.tensors,
                   "rank0_bytes_read": report.bytes_read, "seconds": round(time.monotonic() - started, 2)}
        if layout.rank == 0:
            print(f"[done] {summary}", flush=True)
        return summary


def main(argv=None) -> int:
    """CLI entry (also callable in-process, e.g. inside torchrun). Returns the exit code."""
    from megatron_grpo.errors import run_tool

    return run_tool(parse_args(argv), _preflight, run)


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep this guard
    sys.exit(main())
