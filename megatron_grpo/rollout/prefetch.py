"""One-step off-policy generation (``rollout.async_steps: 1``): the batch of step k+1 is generated
with the weights of step k-1 while step k trains. Design and reasons: ``bench/ASYNC_DESIGN.md``.

The schedule, every rank, step k (the policy holds version v_{k-1} before its update):

1. ``take(k)``: join the generation of step k's batch (started in step k-1, weights v_{k-2});
   the first step of a run has none and generates now.
2. ``sync_engine()``: only now, with no generate in flight, the engine gets v_{k-1} (a weight
   update inside a running generate would mix versions within one batch).
3. ``launch(k)``: draw step k+1's prompts and start its generation with v_{k-1}: on a thread of
   the driver rank with the disaggregated engine (it overlaps step k's training), or right away
   with the colocated one (same schedule and results, no overlap: trainer and engine share devices).
4. train step k; ``trained()``: the policy is now v_k. No sync at the end of the step.

Every batch is therefore at most one version old (``staleness`` refuses anything older). A
checkpoint at step k joins the in-flight batch of step k+1 and saves it (``state_dict``): the resumed
run trains on the very same samples, without needing the weights of v_{k-1} again.
"""
from __future__ import annotations

import dataclasses
import time

from megatron_grpo.rollout.types import RolloutBatch

__all__ = ["OffPolicyRollout", "rollout_seed"]


def rollout_seed(cfg, step: int, tries: int) -> int:
    """The engine seed of a step's ``tries``-th generate call (dynamic sampling makes several)."""
    return cfg.trainer.seed * 1_000_003 + step * 101 + tries


class OffPolicyRollout:
    """Owns the one in-flight generate of ``async_steps=1`` and the policy's weight version."""

    def __init__(self, cfg, *, engine, bridge, data, sampler, sampling, policy_version: int, num_steps: int, log):
        self.cfg, self.engine, self.bridge, self.data, self.sampler = cfg, engine, bridge, data, sampler
        self.sampling, self.num_steps = sampling, num_steps
        self.max_staleness = int(cfg.rollout.async_steps)
        self.policy_version = int(policy_version)  # the trainer's weights; the engine's is bridge.version
        self.overlaps = callable(getattr(engine, "generate_in_background", None))
        self._pending = None  # (step, prompt indices, join) of the batch in flight
        self.wait_s = 0.0
        if self.overlaps:
            log("rollout.async_steps=1: step k+1's batch is generated (weights of step k-1) on the driver's thread "
                "while step k trains")
        else:
            log(f"rollout.async_steps=1 on the {getattr(engine, 'placement', 'colocated')} engine: no overlap "
                "(trainer and engine share the devices); step k+1's batch is generated before step k trains, with the "
                "weights of step k-1 (same schedule and samples as the disaggregated placement)")

    # -- the schedule -------------------------------------------------------------------------------
    def take(self, step: int):
        """``(prompt indices, batch)`` of this step's first generate, started a step earlier; None if
        nothing is in flight (the first step of a run): the caller generates now."""
        self.wait_s = 0.0
        if self._pending is None:
            return None
        pending_step, idx, join = self._pending
        self._pending = None
        if pending_step != step:
            raise RuntimeError(f"async rollout: the batch in flight is step {pending_step}'s, not step {step}'s")
        t = time.monotonic()
        batch = join()
        self.wait_s = time.monotonic() - t
        return idx, batch

    def sync_engine(self) -> None:
        """Bring the engine to the policy's weights; only with no generate in flight."""
        if self._pending is not None:
            raise RuntimeError("async rollout: weight sync while a generate is in flight")
        if self.bridge.version != self.policy_version:
            self.bridge.sync(version=self.policy_version)

    def launch(self, step: int) -> None:
        """Start the generation of step+1's batch with the engine's current weights (none after the last step)."""
        if step >= self.num_steps:
            return
        idx = self.sampler.next_global_batch()
        prompts = list(self.data.train.select(idx)["prompt_ids"])
        seed = rollout_seed(self.cfg, step + 1, 1)
        if self.overlaps:
            join = self.engine.generate_in_background(prompts, self.sampling, seed=seed)
        else:
            batch = self.engine.generate(prompts, self.sampling, seed=seed)
            join = lambda: batch  # noqa: E731
        self._pending = (step + 1, idx, join)

    def trained(self) -> None:
        """The optimizer updated the policy: one version newer than before."""
        self.policy_version += 1

    def check(self, rollout: RolloutBatch) -> dict:
        """Staleness of the batch about to be trained on; more than ``async_steps`` versions is refused."""
        staleness = self.policy_version - int(rollout.weight_version)
        if staleness < 0 or staleness > self.max_staleness:
            raise RuntimeError(f"async rollout: batch of weight version {rollout.weight_version} for a policy at "
                               f"version {self.policy_version} (staleness {staleness}, allowed 0..{self.max_staleness})")
        return {"rollout/staleness": float(staleness), "time/rollout_wait": self.wait_s}

    def settle(self) -> None:
        """Join the in-flight generate now (before an eval, a checkpoint or a sync); it stays the next step's."""
        if self._pending is not None:
            pending_step, idx, join = self._pending
            batch = join()
            self._pending = (pending_step, idx, lambda: batch)

    def sync_for_eval(self) -> None:
        """Evaluation sees the policy's current weights, as with ``async_steps=0``."""
        self.settle()
        if self.bridge.version != self.policy_version:
            self.bridge.sync(version=self.policy_version)

    # -- checkpoint -----------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """The in-flight batch (joined), saved with the checkpoint so a resume trains on the same samples."""
        self.settle()
        if self._pending is None:
            return None
        pending_step, idx, join = self._pending
        return {"step": pending_step, "indices": [int(i) for i in idx], "batch": dataclasses.asdict(join())}

    def load_state_dict(self, state: dict | None, *, next_step: int) -> None:
        if state is None:
            return
        if int(state["step"]) != next_step:
            raise RuntimeError(f"async rollout: the checkpoint's in-flight batch is step {state['step']}'s, "
                               f"the run resumes at step {next_step}")
        batch = RolloutBatch(**state["batch"])
        batch.validate()
        self._pending = (next_step, list(state["indices"]), lambda: batch)
