"""Rewards whose value for one sample depends on the other samples of the batch.

The Kimi 1.5 length reward rescales lengths by the batch's (or group's) min and max. Chunking a batch
over worker processes would change those statistics, so such a reward is split in two:

* ``per_sample(completions, *, solutions, **kwargs) -> list``: the expensive part that may hang
  (math-verify); runs chunked in the worker pool, one value per sample.
* ``combine(per_sample_values, completions, *, solutions, **kwargs) -> list[float | None]``: cheap,
  runs once in the caller's process over the whole batch. A sample whose per-sample call failed or
  timed out arrives as ``None``; the manager overwrites that sample's final value anyway.

Calling the object directly runs both stages in-process, with the usual reward signature.
"""
from __future__ import annotations

from typing import Any, Sequence


class StagedReward:
    """Base class: subclasses implement per_sample and combine."""

    def per_sample(self, completions: Sequence[Any], *, solutions: Sequence[str] | None = None, **kwargs: Any) -> list:
        raise NotImplementedError

    def combine(
        self, per_sample_values: list, completions: Sequence[Any], *, solutions: Sequence[str] | None = None, **kwargs: Any
    ) -> list[float | None]:
        raise NotImplementedError

    def __call__(self, completions: Sequence[Any], *, solutions: Sequence[str] | None = None, **kwargs: Any) -> list[float | None]:
        values = self.per_sample(completions, solutions=solutions, **kwargs)
        return self.combine(values, completions, solutions=solutions, **kwargs)
