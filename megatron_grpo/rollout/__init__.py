"""vLLM rollout engines (colocated in the training ranks, disaggregated on their own processes, or
rollout servers on their own nodes: ``server`` / ``remote``).

Importing this package does not import vLLM; the engines import it when constructed.
"""
from megatron_grpo.rollout.config import EngineConfig, engine_kwargs
from megatron_grpo.rollout.types import RolloutBatch, SamplingConfig, prompt_seed


def __getattr__(name):
    if name in ("ColocatedEngine", "VLLMRunner", "chunk_bounds"):
        from megatron_grpo.rollout import engine

        return getattr(engine, name)
    if name in ("DisaggregatedEngine",):
        from megatron_grpo.rollout import disaggregated

        return getattr(disaggregated, name)
    if name in ("RemoteEngine",):
        from megatron_grpo.rollout import remote

        return getattr(remote, name)
    raise AttributeError(name)


__all__ = ["EngineConfig", "engine_kwargs", "RolloutBatch", "SamplingConfig", "prompt_seed",
           "ColocatedEngine", "DisaggregatedEngine",
           "RemoteEngine"]
