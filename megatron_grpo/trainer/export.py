"""Export the trained policy as an HF model folder (weights, config, tokenizer) with a model card.

The weights are streamed from every rank's shards to rank 0 (``models.checkpoint_io.export_hf``);
the folder is written as ``<out>.partial`` and renamed when complete, so a crash mid-export never
leaves a folder that looks usable.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from megatron_grpo.models.checkpoint_io import copy_hf_side_files, export_hf


def export_policy(cfg: DictConfig, *, policy, out_dir: Path, step: int, metrics_path: Path) -> Path:
    rank0 = dist.get_rank() == 0
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if rank0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    export_hf(policy.chunks, policy.info, tmp)
    if rank0:
        copy_hf_side_files(cfg.model.path, tmp)
        (tmp / "README.md").write_text(model_card(cfg, step=step, metrics_path=metrics_path))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    dist.barrier()
    return out_dir


def _final_metrics(metrics_path: Path) -> dict:
    if not metrics_path.is_file():
        return {}
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    last = rows[-10:]
    keys = ("reward/mean", "eval/accuracy", "eval/reward_mean", "eval/pass@1")
    out = {}
    for k in keys:
        vals = [r[k] for r in last if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def model_card(cfg: DictConfig, *, step: int, metrics_path: Path) -> str:
    rewards = ", ".join(f"{r.name} (weight {r.weight})" for r in cfg.rewards.functions)
    a = cfg.algorithm
    lines = [
        "---", "library_name: transformers", "tags: [grpo, megatron-grpo, reinforcement-learning]", "---", "",
        "# GRPO-trained model", "",
        f"Trained with megatron-grpo (GRPO on megatron-core, vLLM rollouts) for {step} steps.", "",
        f"- Base model: `{cfg.model.path}`",
        f"- Data: `{cfg.data.path}` (prompt column `{cfg.data.prompt_column}`, solution column `{cfg.data.solution_column}`)",
        f"- Rewards: {rewards}",
        f"- Algorithm: G={cfg.rollout.num_generations}, {a.num_prompts_per_step} prompts/step, "
        f"advantage scale {a.adv_scale}, clip [{a.ratio_clip_low}, {a.ratio_clip_high}], KL {a.kl_kind} x {a.kl_coef}, "
        f"loss aggregation {a.loss_agg}",
        f"- Optimizer: lr {cfg.optimizer.lr} ({cfg.optimizer.scheduler}), clip_grad {cfg.optimizer.clip_grad}",
        f"- Parallelism: TP={cfg.parallel.tp} PP={cfg.parallel.pp}; rollout TP={cfg.rollout.tp}", "",
        "## Final metrics (mean of the last 10 logged steps)", "",
    ]
    final = _final_metrics(metrics_path)
    lines += [f"- {k}: {v:.4f}" for k, v in final.items()] or ["- (no metrics logged)"]
    return "\n".join(lines) + "\n"
