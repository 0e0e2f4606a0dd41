"""Rank body (2 ranks): dist-checkpoint save/load of the whole training state resumes bit for bit.

Per layout (TP1 x PP2 with the plain optimizer; DP2 with the distributed optimizer, whose state is
sharded over DP): 2 GRPO steps, save (``save_training_state``), 2 more steps -> parameters P and
losses L. Then a fresh, differently initialised model + optimizer + scheduler, ``load_training_state``,
the same 2 steps. Plain optimizer: parameters and losses equal P and L exactly (Adam moments, step
counts, LR schedule and RNG all came back). Distributed optimizer: the same, and its inner torch-Adam state
(fp32 main params, exp_avg, exp_avg_sq, the per-parameter step used for bias correction, lr and weight
decay) equals the live one at the save, tensor by tensor (the step was once lost on load: see
``trainer.state._restore_adam_steps``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.dist import training_helpers as H


def _stack(model_dir: str, *, dist_opt: bool, load: bool):
    from megatron_grpo.training import GRPOTrainStep, build_lr_scheduler, build_optimizer, wrap_model_for_training

    model, info = H.build_model(model_dir, load=load)
    ddp = wrap_model_for_training([model], use_distributed_optimizer=dist_opt)
    opt = build_optimizer(ddp, lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0,
                          use_distributed_optimizer=dist_opt)
    sched = build_lr_scheduler(opt, schedule="cosine", warmup_steps=1, total_steps=6)
    step = GRPOTrainStep(ddp, opt, sched, micro_batch_size=2, vocab_size=info.vocab_size)
    return ddp, opt, sched, step, info


def _params(chunks) -> dict:
    from megatron_grpo.models.loader import named_global_parameters

    return {n: p.detach().clone() for n, p in named_global_parameters(chunks)}


def _adam_state(opt) -> list:
    """The inner torch optimizer's state in parameter order: (hyper-parameters, {key: tensor}) per param."""
    out = []
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for group in sub.optimizer.param_groups:
            hp = {k: group[k] for k in ("lr", "weight_decay", "betas", "eps")}
            for p in group["params"]:
                st = sub.optimizer.state.get(p, {})
                out.append((hp, {"param": p.detach().clone(),
                                 **{k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)}}))
    return out


def _adam_state_diff(a: list, b: list) -> float:
    """Largest difference between two ``_adam_state`` snapshots; inf if their structure differs."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for (hpa, ta), (hpb, tb) in zip(a, b):
        if hpa != hpb or ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
            return float("inf")
        worst = max([worst] + [float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel()])
    return worst


def _run_layout(report: dict, model_dir: str, root: Path, *, tp: int, pp: int, dist_opt: bool) -> None:
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, init_distributed
    from megatron_grpo.trainer.checkpoint import CheckpointWriter
    from megatron_grpo.trainer.state import load_training_state, save_training_state

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(tp=tp, pp=pp)
    layout = current_layout()
    batch = H.fixed_batch(500, 8, seed=5)
    batch.old_logprobs = torch.zeros_like(batch.completion_mask) - 3.0
    shard = batch.shard_for_dp(layout.dp_rank, layout.dp)
    name = f"tp{tp}pp{pp}{'_distopt' if dist_opt else ''}"

    ddp, opt, sched, step, _ = _stack(model_dir, dist_opt=dist_opt, load=True)
    for _ in range(2):
        step(shard)
    writer = CheckpointWriter(root / name, keep_last=2)
    final = save_training_state(writer, 2, model_chunks=ddp, optimizer=opt, scheduler=sched,
                                trainer_state={"marker": name}, meta={"tp": tp, "pp": pp})
    at_save, adam_at_save = _params(ddp), _adam_state(opt)
    losses = [step(shard)["loss"] for _ in range(2)]
    want = _params(ddp)

    ddp2, opt2, sched2, step2, _ = _stack(model_dir, dist_opt=dist_opt, load=False)
    assert any(not torch.equal(want[n], p) for n, p in _params(ddp2).items())  # really a different start
    state = load_training_state(final, model_chunks=ddp2, optimizer=opt2, scheduler=sched2)
    assert state["marker"] == name and state["step"] == 2
    after_load, adam_after_load = _params(ddp2), _adam_state(opt2)
    again = [step2(shard)["loss"] for _ in range(2)]
    got = _params(ddp2)
    report[name] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, again)),
        "param_diff": max(float((want[n] - got[n]).abs().max()) for n in want),
        "load_diff": max(float((at_save[n] - after_load[n]).abs().max()) for n in at_save),
        "adam_state_diff": _adam_state_diff(adam_at_save, adam_after_load),
        "adam_state_keys": sorted({k for _, t in adam_at_save for k in t}),
        "loss_diffs": [abs(a - b) for a, b in zip(losses, again)],
        "written_by": json.loads((final / "COMPLETE").read_text()).get("megatron_core_version"),
    }


def resume_exact(model_dir: str, root: str) -> dict:
    from megatron_grpo.distributed.init import destroy_distributed

    report: dict = {}
    _run_layout(report, model_dir, Path(root), tp=1, pp=2, dist_opt=False)
    _run_layout(report, model_dir, Path(root), tp=1, pp=1, dist_opt=True)
    destroy_distributed()
    return report
