"""A resumable, deterministic prompt sampler with data-parallel sharding.

Order: epoch e visits the dataset in a permutation fixed by (seed, e) alone. State is
``{epoch, position, seed}`` (+ the sizes it was built for, checked on restore), where position counts
prompts of epoch e already handed out. Restoring a state reproduces the following batches exactly.

Sharding: every rank computes the same *global* batch (``global_batch_size`` prompts) and keeps its
contiguous slice of ``global_batch_size // world_size`` -- so shards are disjoint, together they cover
the global batch, and the state is identical on all ranks: a checkpoint taken at one world size
resumes at another with the same global order. ``next_global_batch()`` returns the whole batch for a
caller that splits it itself (e.g. rank 0 generating for everyone).

Epoch ends: with drop_last (default) a global batch never spans two epochs -- the leftover prompts
of an epoch are skipped (a different permutation next epoch shows them); with drop_last=False the
batch is completed from the next epoch's permutation.
"""
from __future__ import annotations

import random
from typing import Any, Iterator


class ResumablePromptSampler:
    """Yields lists of dataset indices. Not a torch Sampler: the trainer pulls a batch per step."""

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch_size: int,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if drop_last and global_batch_size > num_samples:
            raise ValueError(
                f"global_batch_size {global_batch_size} exceeds the {num_samples} prompts; use drop_last=False"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size if self.drop_last else -(-self.num_samples // self.global_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of epoch ``epoch``; a function of (seed, epoch) only."""
        if self._order_epoch != epoch:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(f"megatron_grpo.sampler:{self.seed}:{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_global_batch(self) -> list[int]:
        """The next global batch (the same on every rank); advances the state."""
        if self.drop_last and self.num_samples - self.position < self.global_batch_size:
            self.epoch, self.position = self.epoch + 1, 0
        batch: list[int] = []
        while len(batch) < self.global_batch_size:
            take = min(self.global_batch_size - len(batch), self.num_samples - self.position)
            batch.extend(self.epoch_order(self.epoch)[self.position:self.position + take])
            self.position += take
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def next_batch(self) -> list[int]:
        """This rank's contiguous shard of the next global batch."""
        batch = self.next_global_batch()
        start = self.rank * self.local_batch_size
        return batch[start:start + self.local_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; the dataset size must match (a changed dataset changes every order)."""
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} prompts, this dataset has {self.num_samples}"
            )
        if not 0 <= int(state["position"]) <= self.num_samples:
            raise ValueError(f"sampler state position {state['position']} outside [0, {self.num_samples}]")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = None
