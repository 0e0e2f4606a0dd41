"""Rank bodies: a training state written at one layout, resumed at another (dist_checkpointing
resharding of the model and of the optimizer). ``save_then_continue`` trains 2 steps at TP1 (1 rank),
saves, trains a 3rd step and reports the weights; ``resume_at`` loads that checkpoint at another
layout, checks the loaded weights against the saved ones and trains the same 3rd step."""
from __future__ import annotations

from pathlib import Path

from tests.dist import training_helpers as H

LR = 3e-3


def _stack(model_dir: str, *, tp: int, pp: int = 1, distopt: bool = False):
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.training import GRPOTrainStep, build_lr_scheduler, build_optimizer, wrap_model_for_training

    init_distributed(tp=tp, pp=pp)
    model, info = H.build_model(model_dir)
    chunks = wrap_model_for_training([model], use_distributed_optimizer=distopt)
    opt = build_optimizer(chunks, lr=LR, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=distopt)
    sched = build_lr_scheduler(opt, schedule="cosine", warmup_steps=1, total_steps=10)
    batch = H.fixed_batch(info.vocab_size, 8)
    batch.old_logprobs = compute_logprobs(chunks, batch.input_ids, batch.completion_mask, micro_batch_size=4,
                                          temperature=1.0, vocab_size=info.vocab_size)
    step = GRPOTrainStep(chunks, opt, sched, micro_batch_size=4, temperature=1.0, vocab_size=info.vocab_size,
                         loss=dict(kl_coef=0.0, eps_low=0.2))
    return chunks, info, opt, sched, step, batch


def _full(chunks, info) -> dict:
    return {k: v.tolist() for k, v in H.gather_full(chunks, info).items()}


def save_then_continue(model_dir: str, root: str, distopt: bool = False) -> dict:
    from megatron_grpo.trainer.checkpoint import CheckpointWriter
    from megatron_grpo.trainer.state import current_layout, save_training_state

    report = {}
    chunks, info, opt, sched, step, batch = _stack(model_dir, tp=1, distopt=distopt)
    for _ in range(2):
        step(batch)
    writer = CheckpointWriter(Path(root), keep_last=2, run_id="reshard")
    final = save_training_state(writer, 2, model_chunks=chunks, optimizer=opt, scheduler=sched,
                                trainer_state={"sampler": {}, "weight_version": 2}, meta=current_layout())
    report["saved"] = _full(chunks, info)
    report["ckpt"] = str(final)
    step(batch)
    report["after3"] = _full(chunks, info)
    return report


def resume_at(model_dir: str, ckpt: str, tp: int, pp: int = 1, distopt: bool = False) -> dict:
    from megatron_grpo.trainer.state import load_training_state

    report = {}
    chunks, info, opt, sched, step, batch = _stack(model_dir, tp=tp, pp=pp, distopt=distopt)
    state = load_training_state(Path(ckpt), model_chunks=chunks, optimizer=opt, scheduler=sched, seed=7)
    report["step"] = state["step"]
    report["loaded"] = _full(chunks, info)
    report["lr"] = opt.param_groups[0]["lr"]
    step(batch)
    report["after3"] = _full(chunks, info)
    return report


def resume_error_at(model_dir: str, ckpt: str, tp: int, pp: int = 1, distopt: bool = False) -> dict:
    """What a rank reports when megatron-core cannot load the checkpoint at this layout."""
    from megatron_grpo.errors import one_line
    from megatron_grpo.trainer.checkpoint import CheckpointError
    from megatron_grpo.trainer.state import load_training_state

    chunks, info, opt, sched, step, batch = _stack(model_dir, tp=tp, pp=pp, distopt=distopt)
    try:
        load_training_state(Path(ckpt), model_chunks=chunks, optimizer=opt, scheduler=sched, seed=7)
    except CheckpointError as e:
        return {"error": one_line(e), "lines": len(str(e).splitlines())}
    return {"error": None}
