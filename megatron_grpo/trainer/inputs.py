"""Every check of a run's inputs, in one place, before any process group, model or engine exists and
before anything of the run is written: config, packages, locally generated assets (made on first
use), weights and sampling settings (config/preflight.py), tokenizer, dataset, the output folder and
the checkpoint to resume (trainer/run_dir.py). `megatron-grpo train --check` runs just this."""
from __future__ import annotations

from omegaconf import DictConfig


def check_inputs(cfg: DictConfig):
    """(tokenizer, prompt data, number of steps, context length, RunPlan); raises one-line input errors."""
    from megatron_grpo.config import validate
    from megatron_grpo.config.preflight import preflight
    from megatron_grpo.config.validate import check_runtime_packages
    from megatron_grpo.trainer import components as C
    from megatron_grpo.trainer.assets import prepare_assets
    from megatron_grpo.trainer.loop import load_tokenizer
    from megatron_grpo.trainer.run_dir import plan_run

    validate(cfg)
    check_runtime_packages(cfg)
    prepare_assets(cfg)
    preflight(cfg)
    tokenizer = load_tokenizer(cfg)
    data = C.load_prompt_data(cfg, tokenizer)
    num_steps = C.total_steps(cfg, len(data.train))
    context_len = C.max_model_len(cfg)
    run = plan_run(cfg)
    return tokenizer, data, num_steps, context_len, run
