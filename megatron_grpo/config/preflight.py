"""Input checks that need more than the config itself, run before anything is written and before any
process group, model or engine is built: the launcher's world size, weight files and their headers,
settings the trainer cannot honour; and warnings for settings that run but are likely mistakes.

Reading a safetensors header costs one small read per file, so a truncated shard is named in a
second instead of surfacing as a traceback from inside the model build minutes later.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

from omegaconf import DictConfig

from .loader import ConfigError


def check_launch(cfg: DictConfig, nproc_per_node: int) -> None:
    """`train --nproc-per-node N` on one machine: N is the world size; check it in the parent."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    world = int(cfg.parallel.world_size) if cfg.parallel.world_size is not None else nproc_per_node
    if world != nproc_per_node:
        raise ConfigError(f"parallel.world_size={world} but --nproc-per-node={nproc_per_node} ranks are launched")
    if world % (tp * pp):
        raise ConfigError(f"--nproc-per-node={world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
    r = cfg.rollout
    if r.placement == "colocated" and world % r.tp:
        raise ConfigError(f"rollout.tp={r.tp} does not divide --nproc-per-node={world}")


def safetensors_problem(path: Path) -> str | None:
    """None if the file's header parses and the file is as long as the header says; else why."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                return f"header length {n} exceeds the file's {size} bytes (truncated or not safetensors)"
            header = json.loads(fh.read(n))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "header is not valid JSON (corrupt or not safetensors)"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"tensor {name!r} has no valid data_offsets"
    if 8 + n + end > size:
        return f"truncated: {size} bytes, its header needs {8 + n + end}"
    return None


def check_weights(model_dir: Path) -> None:
    """Weight files present (single file or every shard of the index) and their headers readable."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"model.path: {index} is not a valid safetensors index (no weight_map)") from None
    elif (d / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        return  # legacy format: read (and checked) by the loader
    else:
        raise ConfigError(f"model.path: {d} has no weights (model.safetensors or model.safetensors.index.json "
                          "with its shards)")
    for shard in shards:
        f = d / shard
        if not f.is_file():
            raise ConfigError(f"model.path: {f} is listed in {index.name} but does not exist")
        problem = safetensors_problem(f)
        if problem is not None:
            raise ConfigError(f"model.path: {f}: {problem}")


def check_sampling(cfg: DictConfig, vocab: int | None) -> None:
    """Rollout and algorithm settings the trainer cannot train on, as one line each."""
    r, a = cfg.rollout, cfg.algorithm
    if r.temperature == 0:
        raise ConfigError("rollout.temperature=0 (greedy): all G completions of a prompt are identical, so every "
                          "advantage is 0, and the trainer's logprobs divide by the temperature; use > 0 (e.g. 1.0)")
    if vocab is not None and r.top_k > vocab:
        raise ConfigError(f"rollout.top_k={r.top_k} exceeds the model's vocabulary of {vocab} tokens")
    if r.top_k < -1:
        raise ConfigError(f"rollout.top_k={r.top_k}: use -1 (or 0) to disable top-k, or a positive k")
    bad_ids = [t for t in r.stop_token_ids if vocab is not None and not 0 <= t < vocab]
    if bad_ids:
        raise ConfigError(f"rollout.stop_token_ids: {bad_ids[0]} is not a token id of the model (vocab {vocab})")
    if any(not s for s in r.stop):
        raise ConfigError("rollout.stop contains an empty string (it would stop every completion at once)")
    if a.importance_sampling is not None and a.importance_sampling_cap < 1:
        raise ConfigError(f"algorithm.importance_sampling_cap={a.importance_sampling_cap} must be >= 1 "
                          "(it truncates the trainer/rollout probability ratio from above)")
    if a.kl_clamp <= 0:
        raise ConfigError(f"algorithm.kl_clamp={a.kl_clamp} must be > 0")
    if a.dynamic_sampling and a.dynamic_sampling_max_batches < 1:
        raise ConfigError(f"algorithm.dynamic_sampling_max_batches={a.dynamic_sampling_max_batches} must be >= 1")
    if cfg.checkpoint.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 0 (0 keeps all)")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be > 0")


def likely_mistakes(cfg: DictConfig) -> list[str]:
    """Settings that run but are probably not what was meant."""
    r, a, o = cfg.rollout, cfg.algorithm, cfg.optimizer
    out = []
    if r.top_p < 1 or r.top_k > 0:
        out.append("rollout.top_p/top_k truncate sampling, but the trainer's logprobs use the full distribution: "
                   "ratios against the rollout are biased (set algorithm.importance_sampling to correct for it)")
    if a.kl_coef == 0 and a.kl_in_reward:
        out.append("algorithm.kl_in_reward=true has no effect with algorithm.kl_coef=0")
    if a.ratio_clip_high < a.ratio_clip_low:
        out.append(f"algorithm.ratio_clip_high={a.ratio_clip_high} < ratio_clip_low={a.ratio_clip_low} "
                   "(clip-higher uses high >= low)")
    if o.lr >= 1e-3:
        out.append(f"optimizer.lr={o.lr} is very high for RL fine-tuning (typical: 1e-6 .. 1e-5)")
    if r.num_generations < 4:
        out.append(f"rollout.num_generations={r.num_generations}: group statistics of fewer than 4 completions are noisy")
    steps = cfg.trainer.max_steps
    if steps is not None and steps >= 200 and cfg.checkpoint.save_steps == 0:
        out.append(f"checkpoint.save_steps=0 with {steps} steps: a crash loses everything since the start "
                   "(checkpoints only at the end and on preemption signals)")
    return out


def preflight(cfg: DictConfig) -> None:
    """Every check of the run's inputs that runs before the process group (called on every rank)."""
    vocab = None
    cfg_file = Path(cfg.model.path) / "config.json"
    if cfg_file.is_file():
        try:
            vocab = int(json.loads(cfg_file.read_text())["vocab_size"])
        except (ValueError, KeyError, TypeError):
            vocab = None
    check_sampling(cfg, vocab)
    check_weights(Path(cfg.model.path))
    if os.environ.get("RANK", "0") == "0":
        for msg in likely_mistakes(cfg):
            print(f"warning: {msg}", file=sys.stderr, flush=True)
