"""The GRPO loop and its services (checkpoints, metrics, evaluation, export).

`megatron_grpo.training` holds the optimizer step on Megatron models; this package drives it.
"""


def run_training(cfg) -> int:  # imported lazily by the CLI: heavy imports live in loop.py
    from .loop import run_training as _run

    return _run(cfg)
