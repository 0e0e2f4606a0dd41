"""Rewards for a whole rollout batch in a distributed run: rank 0 scores, everyone receives.

Scoring the full batch in one place keeps batch-relative rewards (Kimi length, per-group min/max)
exactly as defined, and costs one broadcast of a few floats per completion. Rank 0's RewardManager
runs its own worker pool with hard timeouts (see rewards/manager.py).
"""
from __future__ import annotations

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_grpo.rewards import RewardBatchResult, RewardManager


class BatchScorer:
    def __init__(self, cfg: DictConfig):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.manager = None
        if self.rank == 0:
            specs = []
            for entry in cfg.rewards.functions:
                spec = OmegaConf.to_container(entry, resolve=True)
                spec["timeout_s"] = spec.get("timeout_s") or cfg.rewards.timeout_s
                specs.append(spec)
            self.manager = RewardManager(specs, num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s)

    def __call__(self, texts: list[str], *, solutions: list[str], completion_ids: list[list[int]],
                 group_ids: list[int] | None = None) -> RewardBatchResult:
        box = [None]
        if self.rank == 0:
            extra = {"group_ids": group_ids} if group_ids is not None else {}
            box[0] = self.manager(texts, solutions=solutions, completion_ids=completion_ids, **extra)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def counters(self) -> dict:
        return dict(self.manager.counters) if self.manager is not None else {}

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def report_reward_failures(result: RewardBatchResult, *, step: int, logger, log) -> None:
    """Rank 0: each reward's first failure of the step (type, message, sample) and its counts, to the
    log and the samples file -- a raising reward plugin otherwise shows up only as a count."""
    failures = getattr(result, "failures", None) or {}
    for key, f in sorted(failures.items()):
        where = f"sample {f['sample']}" + (f" of batch {f['batch']}" if "batch" in f else "")  # dynamic sampling
        log(f"reward '{key}' step {step}: {f['errors']} error(s), {f['timeouts']} timeout(s); first "
            f"{f['kind']} at {where}: {f['message'].splitlines()[0] if f['message'] else ''}")
    if failures and logger is not None:
        logger.log_samples(step, [{"reward_failure": key, **f} for key, f in sorted(failures.items())])


# per-batch counts that add up over dynamic sampling's rounds (the rest describe the kept batch)
_ROUND_SUMS = ("/errors", "/timeouts", "reward/workers_replaced", "reward/compute_seconds")


def with_all_rounds(result: RewardBatchResult, rounds: list[RewardBatchResult]) -> RewardBatchResult:
    """The step's result with the reward failures of every generate+score round (dynamic sampling),
    not only of the groups it kept: counts summed, each reward's first failure (its ``batch`` is
    the 1-based round, ``sample`` the index in that round's batch). Groups a failing reward made
    zero-variance are exactly the ones dropped, so their errors must not vanish with them."""
    import dataclasses

    metrics = dict(result.metrics)
    for key in {k for r in rounds for k in r.metrics if k.endswith(_ROUND_SUMS)}:
        metrics[key] = float(sum(r.metrics.get(key, 0.0) for r in rounds))
    failures: dict[str, dict] = {}
    for batch, r in enumerate(rounds, start=1):
        for key, f in (getattr(r, "failures", None) or {}).items():
            if key not in failures:
                failures[key] = {**f, "batch": batch, "errors": 0, "timeouts": 0}
            failures[key]["errors"] += f["errors"]
            failures[key]["timeouts"] += f["timeouts"]
    return dataclasses.replace(result, metrics=metrics, failures=failures)
