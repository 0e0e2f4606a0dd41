"""Megatron -> vLLM weight resharding bridge (TP gather, PP move, HF conversion, buckets) and the doctor."""
from megatron_grpo.bridge.sync import SyncStats, WeightBridge

__all__ = ["WeightBridge", "SyncStats"]
