"""Rewards for GRPO: Open R1's math accuracy, format and shaping rewards, a registry with plugins,
and a RewardManager that scores batches in worker processes with hard timeouts.

Reward signature (batch-wise, as in TRL / open-r1)::

    fn(completions: list[str], *, solutions: list[str] | None, **kwargs) -> list[float | None]

None means "no reward for this sample"; RewardManager keeps it as None in the per-reward lists and,
per reward, either counts it as a configured value in the total or marks the sample excluded.
"""
from megatron_grpo.rewards.format import make_format_reward, make_reasoning_steps_reward, make_tag_count_reward
from megatron_grpo.rewards.length import (
    KimiLengthReward,
    make_cosine_reward,
    make_len_reward,
    make_repetition_penalty_reward,
    make_soft_overlong_reward,
)
from megatron_grpo.rewards.manager import RewardBatchResult, RewardManager
from megatron_grpo.rewards.math_accuracy import (
    answer_extraction_config,
    gold_extraction_config,
    is_correct,
    make_accuracy_reward,
)
from megatron_grpo.rewards.registry import (
    RewardSpec,
    build_reward,
    import_plugin,
    known_reward_names,
    register_reward,
    resolve_reward,
)
from megatron_grpo.rewards.staged import StagedReward

__all__ = [
    "KimiLengthReward",
    "RewardBatchResult",
    "RewardManager",
    "RewardSpec",
    "StagedReward",
    "answer_extraction_config",
    "build_reward",
    "gold_extraction_config",
    "import_plugin",
    "is_correct",
    "known_reward_names",
    "make_accuracy_reward",
    "make_cosine_reward",
    "make_format_reward",
    "make_len_reward",
    "make_reasoning_steps_reward",
    "make_repetition_penalty_reward",
    "make_soft_overlong_reward",
    "make_tag_count_reward",
    "register_reward",
    "resolve_reward",
]
