"""RewardManager: all configured rewards for a batch, in worker processes, with hard timeouts.

Scheduling. Each reward's batch is cut into chunks (default: one per worker, at most ``max_chunk_size``
samples) and all chunks of all rewards share the workers, so 64 completions are not scored one call at
a time. A chunk that times out or raises is retried sample by sample, each single call with the same
timeout: one pathological completion then costs at most two timeouts of wall time and only its own
value; the rest of its chunk is scored normally. (Per-sample calls from the start would isolate
equally well but pay one pipe round trip per sample for every batch, bad or not.)

Values. A sample whose call raised gets ``spec.on_error``, one that timed out ``spec.on_timeout``
(both default 0.0), and the counters ``reward/<key>/errors`` / ``reward/<key>/timeouts`` go up; the run
continues. None (a reward skipping a sample, e.g. an unparseable gold) stays None in the per-reward
lists; in the total it counts as ``weight * spec.on_none``, or -- with ``on_none="exclude"`` -- adds
nothing and sets ``excluded[i]`` so the trainer can leave the sample out of the loss.

Metrics of one batch (``RewardBatchResult.metrics``): ``reward/<key>/mean`` (over non-None values),
``reward/<key>/none``, ``reward/<key>/errors``, ``reward/<key>/timeouts``, ``reward/total/mean``,
``reward/excluded``, ``reward/workers_replaced``, ``reward/compute_seconds``. ``RewardManager.counters``
keeps the run's cumulative ``reward/<key>/errors`` and ``reward/<key>/timeouts``.

Keyword arguments of ``compute`` that are lists of the batch's length are per-sample (sliced with the
chunk, like TRL's dataset columns); anything else is passed whole to every call.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from megatron_grpo.rewards.pool import RewardTask, RewardWorkerPool, TaskOutcome
from megatron_grpo.rewards.registry import RewardSpec, resolve_reward
from megatron_grpo.rewards.staged import StagedReward
from megatron_grpo.rewards.text import completion_text


@dataclass
class RewardBatchResult:
    """Per-reward values (None = skipped), the weighted total, the exclusion mask, batch metrics."""

    rewards: dict[str, list[float | None]]
    total: list[float]
    excluded: list[bool]
    metrics: dict[str, float]
    # reward key -> the batch's first failure: {"sample": i, "kind": "error"|"timeout", "message": "Type: text",
    # "errors": n, "timeouts": n} (so a raising reward plugin says why, not only how often)
    failures: dict[str, dict] = field(default_factory=dict)


def _as_reward_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    raise ValueError(f"a reward returned {value!r}; expected a finite number or None")


class RewardManager:
    """Computes every configured reward of a batch; use as a context manager (closing stops workers).
    One caller thread at a time: ``compute`` is not re-entrant.

    rewards: RewardSpec objects, names, or mappings (``{"name": "format", "weight": 0.5, ...}``).
    num_workers: worker processes (0 = run in this process without timeouts, for debugging).
    timeout_s: per-call limit, enforced by killing the worker; max_chunk_size caps samples per call.
    """

    def __init__(
        self,
        rewards: Iterable[Any],
        *,
        num_workers: int | None = None,
        timeout_s: float = 10.0,
        max_chunk_size: int = 16,
        mp_context: str = "forkserver",
    ):
        self.specs = [RewardSpec.from_config(entry) for entry in rewards]
        if not self.specs:
            raise ValueError("no rewards configured")
        keys = [spec.key for spec in self.specs]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"duplicate reward labels {duplicates}: give each a distinct 'label'")
        if timeout_s <= 0 or max_chunk_size < 1:
            raise ValueError(f"need timeout_s > 0 and max_chunk_size >= 1, got {timeout_s}, {max_chunk_size}")
        resolved = {}
        self._local = {}
        for spec in self.specs:
            spec.validate()
            resolved[spec.key] = resolve_reward(spec.name, spec.params)
            self._local[spec.key] = resolved[spec.key].instantiate()  # fail fast on bad params
        self.timeout_s = float(timeout_s)
        self.max_chunk_size = int(max_chunk_size)
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        self._pool = RewardWorkerPool(resolved, num_workers=num_workers, mp_context=mp_context)
        self._finalizer = weakref.finalize(self, self._pool.close)
        self.counters: dict[str, int] = {}
        for spec in self.specs:
            self.counters[f"reward/{spec.key}/errors"] = 0
            self.counters[f"reward/{spec.key}/timeouts"] = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop all worker processes. Idempotent; also runs when the manager is garbage collected."""
        self._finalizer()

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pool(self) -> RewardWorkerPool:
        return self._pool

    # -- scoring ---------------------------------------------------------------------------------
    def compute(
        self, completions: Sequence[Any], *, solutions: Sequence[str] | None = None, **kwargs: Any
    ) -> RewardBatchResult:
        """Score a batch with every reward; see the module docstring for None/error/timeout handling."""
        started, replaced_before = time.monotonic(), self._pool.workers_replaced
        texts = [completion_text(c) for c in completions]
        n = len(texts)
        solutions = list(solutions) if solutions is not None else None
        if solutions is not None and len(solutions) != n:
            raise ValueError(f"{n} completions but {len(solutions)} solutions")
        per_sample_keys = {k for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == n}
        statuses = {spec.key: ["ok"] * n for spec in self.specs}
        raw = {spec.key: [None] * n for spec in self.specs}
        self._first = {}  # reward key -> (sample, message) of the first failure in this batch
        if n:
            self._score_chunks(texts, solutions, kwargs, per_sample_keys, raw, statuses)
        rewards = self._finish(texts, solutions, kwargs, raw, statuses)
        total, excluded = self._combine(rewards)
        metrics = self._metrics(rewards, statuses, total, excluded)
        metrics["reward/workers_replaced"] = float(self._pool.workers_replaced - replaced_before)
        metrics["reward/compute_seconds"] = time.monotonic() - started
        return RewardBatchResult(rewards=rewards, total=total, excluded=excluded, metrics=metrics,
                                 failures=self._failures(statuses))

    def _note(self, key: str, sample: int, message: str, kind: str = "error") -> None:
        self._first.setdefault((key, kind), (sample, message or "no message"))

    def _failures(self, statuses) -> dict[str, dict]:
        """Per reward: its first exception (or, with none, its first timeout) and the batch's counts."""
        out = {}
        for spec in self.specs:
            status = statuses[spec.key]
            for kind in ("error", "timeout"):
                if (spec.key, kind) in self._first and kind in status:
                    sample, message = self._first[(spec.key, kind)]
                    out[spec.key] = {"sample": sample, "kind": kind, "message": message[:500],
                                     "errors": status.count("error"), "timeouts": status.count("timeout")}
                    break
        return out

    def __call__(self, completions, *, solutions=None, **kwargs) -> RewardBatchResult:
        return self.compute(completions, solutions=solutions, **kwargs)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        workers = max(1, self._pool.num_workers)
        size = max(1, min(self.max_chunk_size, math.ceil(n / workers)))
        return [(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def _task(self, spec, texts, solutions, kwargs, per_sample_keys, lo, hi) -> RewardTask:
        sliced = {k: (list(v[lo:hi]) if k in per_sample_keys else v) for k, v in kwargs.items()}
        stage = "per_sample" if isinstance(self._local[spec.key], StagedReward) else "call"
        return RewardTask(
            reward=spec.key, stage=stage, completions=texts[lo:hi],
            solutions=solutions[lo:hi] if solutions is not None else None,
            kwargs=sliced, timeout_s=spec.timeout_s or self.timeout_s,
        )

    def _score_chunks(self, texts, solutions, kwargs, per_sample_keys, raw, statuses) -> None:
        """Round 1: chunks; round 2: every sample of a failed multi-sample chunk on its own."""
        ranges = []
        for spec in self.specs:
            whole = [(0, len(texts))] if self._batch_relative(spec) else self._chunks(len(texts))
            ranges.extend((spec, lo, hi) for lo, hi in whole)
        for round_index in range(2):
            tasks = [self._task(s, texts, solutions, kwargs, per_sample_keys, lo, hi) for s, lo, hi in ranges]
            outcomes = self._pool.run(tasks)
            retry = []
            for (spec, lo, hi), outcome in zip(ranges, outcomes):
                values = self._checked_values(outcome, hi - lo)
                if values is not None:
                    raw[spec.key][lo:hi] = values
                elif hi - lo > 1 and round_index == 0 and not self._batch_relative(spec):
                    retry.extend((spec, i, i + 1) for i in range(lo, hi))
                else:
                    status = "timeout" if outcome.status == "timeout" else "error"
                    for i in range(lo, hi):
                        statuses[spec.key][i] = status
                    self._note(spec.key, lo, outcome.message, status)
            ranges = retry
            if not ranges:
                return

    def _batch_relative(self, spec: RewardSpec) -> bool:
        """A plain reward marked ``fn.batch_relative = True`` is called on the whole batch, never split
        (a timeout then costs the whole batch its values). Prefer a StagedReward, which chunks."""
        return bool(getattr(self._local[spec.key], "batch_relative", False))

    def _checked_values(self, outcome: TaskOutcome, expected: int) -> list | None:
        """The outcome's values, or None if the call failed or returned malformed values."""
        if outcome.status != "ok":
            return None
        try:
            values = list(outcome.values or [])
            if len(values) != expected:
                raise ValueError("wrong number of values")
            return values
        except Exception:
            outcome.status, outcome.message = "error", "malformed values"
            return None

    def _finish(self, texts, solutions, kwargs, raw, statuses) -> dict[str, list[float | None]]:
        """Run staged rewards' batch stage, validate values, apply error/timeout values."""
        rewards = {}
        for spec in self.specs:
            values = raw[spec.key]
            reward = self._local[spec.key]
            status = statuses[spec.key]
            if isinstance(reward, StagedReward) and texts:
                staged_input = [v if s == "ok" else None for v, s in zip(values, status)]
                try:
                    values = list(reward.combine(staged_input, texts, solutions=solutions, **kwargs))
                    if len(values) != len(texts):
                        raise ValueError("combine returned the wrong number of values")
                except Exception as exc:
                    status[:] = ["error" if s == "ok" else s for s in status]
                    self._note(spec.key, 0, f"combine: {type(exc).__name__}: {exc}")
            final: list[float | None] = []
            for i, value in enumerate(values):
                if status[i] == "ok":
                    try:
                        final.append(_as_reward_value(value))
                        continue
                    except ValueError as exc:
                        status[i] = "error"
                        self._note(spec.key, i, f"ValueError: {exc}")
                final.append(float(spec.on_timeout if status[i] == "timeout" else spec.on_error))
            self.counters[f"reward/{spec.key}/errors"] += status.count("error")
            self.counters[f"reward/{spec.key}/timeouts"] += status.count("timeout")
            rewards[spec.key] = final
        return rewards

    def _combine(self, rewards) -> tuple[list[float], list[bool]]:
        n = len(next(iter(rewards.values()))) if rewards else 0
        total, excluded = [0.0] * n, [False] * n
        for spec in self.specs:
            for i, value in enumerate(rewards[spec.key]):
                if value is None:
                    if spec.on_none == "exclude":
                        excluded[i] = True
                        continue
                    value = float(spec.on_none)
                total[i] += spec.weight * value
        return total, excluded

    def _metrics(self, rewards, statuses, total, excluded) -> dict[str, float]:
        """This batch's metrics; ``counters`` holds the run's cumulative error/timeout counts."""
        metrics: dict[str, float] = {}
        for spec in self.specs:
            values = [v for v in rewards[spec.key] if v is not None]
            metrics[f"reward/{spec.key}/mean"] = sum(values) / len(values) if values else float("nan")
            metrics[f"reward/{spec.key}/none"] = float(len(rewards[spec.key]) - len(values))
            metrics[f"reward/{spec.key}/errors"] = float(statuses[spec.key].count("error"))
            metrics[f"reward/{spec.key}/timeouts"] = float(statuses[spec.key].count("timeout"))
        metrics["reward/total/mean"] = sum(total) / len(total) if total else float("nan")
        metrics["reward/excluded"] = float(sum(excluded))
        return metrics
