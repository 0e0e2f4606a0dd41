#!/usr/bin/env python
"""Export a megatron_grpo dist_checkpointing checkpoint to a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR
    torchrun --nproc-per-node 4 tools/convert_megatron_to_hf.py --ckpt DIR --out DIR      # TP/PP from the ckpt

Writes safetensors (sharded with an index past --max-shard-size) + config.json + generation_config +
tokenizer, loadable by ``transformers.AutoModelForCausalLM`` and vLLM. The model is loaded at the
checkpoint's TP/PP when the world size allows, else at --tp/--pp (dist_checkpointing re-shards), and
streamed tensor by tensor to rank 0, which writes the shards. Refuses to overwrite a non-empty
``--out`` without ``--force``. Exit code 2 on a usage/input error.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a checkout without install

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '123' -> bytes (powers of 1000 for XB, 1024 for XiB)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    num, unit, b = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").upper()
    base = 1024 if b == "IB" else 1000
    return int(num * base ** " KMGT".index(unit or " "))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder written by convert_hf_to_megatron / training")
    p.add_argument("--out", required=True, help="output Hugging Face folder")
    p.add_argument("--tp", type=int, default=None, help="TP to load at (default: the checkpoint's, if the world allows)")
    p.add_argument("--pp", type=int, default=None, help="PP to load at (default: the checkpoint's, if the world allows)")
    p.add_argument("--ep", type=int, default=None, help="expert parallel size to load at, MoE models (default: the "
                   "checkpoint's, if the world allows)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the written weights (auto: the checkpoint's)")
    p.add_argument("--hf-config", default=None,
                   help="folder to take config/tokenizer files from (default: the checkpoint's hf/)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors files past this size (default 5GB)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    return p.parse_args(argv)


def _preflight(args):
    from megatron_grpo.models.checkpoint_io import HF_SUBDIR, CheckpointError, read_checkpoint_meta
    from megatron_grpo.models.moe import check_moe_parallel
    from megatron_grpo.models.provider import ModelInfo, check_parallel

    meta = read_checkpoint_meta(args.ckpt)
    info = ModelInfo.from_dict(meta["model_info"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp is None and args.pp is None:
        tp, pp = (meta["tp"], meta["pp"]) if world % (meta["tp"] * meta["pp"]) == 0 else (1, 1)
    else:
        tp, pp = args.tp or 1, args.pp or 1
    check_parallel(info, tp=tp, pp=pp)
    if world % (tp * pp):
        raise CheckpointError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    ep = args.ep or meta.get("ep", 1)
    if args.ep is None and (world // pp) % (tp * ep):
        ep = 1
    check_moe_parallel(info, tp=tp, ep=ep, pp=pp, world=world)
    if meta["padded_vocab_size"] % tp:
        raise CheckpointError(f"the checkpoint's padded vocab {meta['padded_vocab_size']} does not divide by tp={tp}")
    side = Path(args.hf_config) if args.hf_config else Path(args.ckpt) / HF_SUBDIR
    if not (side / "config.json").is_file():
        raise CheckpointError(f"no config.json in {side}: pass --hf-config with the model's config/tokenizer folder")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CheckpointError(f"{out} exists and is not empty (pass --force to overwrite)")
    return meta, info, tp, pp, ep, side, parse_size(args.max_shard_size)


def _write_side_files(side: Path, out: Path, dtype_name: str) -> None:
    """config.json (dtype updated), generation_config.json, tokenizer files."""
    from megatron_grpo.models.checkpoint_io import copy_hf_side_files

    copy_hf_side_files(side, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = dtype_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out))).save_pretrained(str(out))


def run(args, pre=None) -> dict:
    import torch

    from megatron_grpo.models.checkpoint_io import (export_hf, load_megatron_checkpoint, parallel_session,
                                                    prepare_output_dir, progress_printer)
    from megatron_grpo.models.provider import build_gpt_model, transformer_config

    meta, info, tp, pp, ep, side, shard_bytes = pre if pre is not None else _preflight(args)
    started = time.monotonic()
    with parallel_session(tp=tp, pp=pp, ep=ep) as layout:
        out = prepare_output_dir(args.out, force=args.force, protect=(args.ckpt,))
        config = transformer_config(info, tp=tp, pp=pp, dtype=meta["dtype"], perform_initialization=False, ep=ep)
        model = build_gpt_model(info, config, padded_vocab_size=meta["padded_vocab_size"])
        if layout.rank == 0:
            print(f"[load] {args.ckpt} (saved at tp={meta['tp']} pp={meta['pp']}) at tp={tp} pp={pp}", flush=True)
        load_megatron_checkpoint(model, args.ckpt)
        dtype_name = meta["dtype"] if args.dtype == "auto" else args.dtype
        files = export_hf(model, info, out, dtype=getattr(torch, dtype_name), max_shard_bytes=shard_bytes,
                          progress=progress_printer("export"))
        if layout.rank == 0:
            _write_side_files(side, out, dtype_name)
        summary = {"out": str(out), "tp": tp, "pp": pp, "ep": ep, "dtype": dtype_name, "files": files,
                   "seconds": round(time.monotonic() - started, 2)}
        if layout.rank == 0:
            print(f"[done] {summary}", flush=True)
        return summary


def main(argv=None) -> int:
    """CLI entry (also callable in-process, e.g. inside torchrun). Returns the exit code."""
    from megatron_grpo.errors import run_tool

    return run_tool(parse_args(argv), _preflight, run)


if __name__ == "__main__":  # dist_checkpointing spawns processes: keep this guard
    sys.exit(main())
