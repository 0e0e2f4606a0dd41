"""Reward registry: a name (or a plugin import path) plus keyword params -> a reward function.

Every reward has the batch signature ``fn(completions, *, solutions, **kwargs) -> list[float | None]``
(TRL / open-r1 style; None = no reward for that sample). Built-in names map to factories taking
keyword params. A plugin is named ``"pkg.module:function"``: without params the function is the
reward itself; with params it is called as a factory, ``function(**params)``, which must return one.

Reward workers run in separate processes, so what they run is described by an importable target
(a module-level function) plus plain params, never by a closure: see :class:`ResolvedReward`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from megatron_grpo.rewards.format import make_format_reward, make_reasoning_steps_reward, make_tag_count_reward
from megatron_grpo.rewards.length import (
    make_cosine_reward,
    make_len_reward,
    make_repetition_penalty_reward,
    make_soft_overlong_reward,
)
from megatron_grpo.rewards.math_accuracy import make_accuracy_reward

RewardFn = Callable[..., list]

# open-r1's reward names, so recipes port unchanged.
_REWARD_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "accuracy": make_accuracy_reward,
    "format": make_format_reward,
    "tag_count": make_tag_count_reward,
    "reasoning_steps": make_reasoning_steps_reward,
    "length": make_len_reward,
    "cosine": make_cosine_reward,
    "repetition_penalty": make_repetition_penalty_reward,
    "soft_overlong_punishment": make_soft_overlong_reward,
}


def known_reward_names() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REWARD_FACTORIES)


def register_reward(name: str, factory: Callable[..., RewardFn]) -> None:
    """Add a named reward factory. It must be a module-level callable so that worker processes can
    import it; registering in ``__main__`` of a script does not reach the workers -- use a plugin path."""
    if ":" in name:
        raise ValueError(f"reward name {name!r} must not contain ':' (reserved for plugin paths)")
    if name in _REWARD_FACTORIES:
        raise ValueError(f"reward {name!r} is already registered")
    _REWARD_FACTORIES[name] = factory


def import_plugin(path: str) -> Any:
    """Import ``"pkg.module:attr"``; every failure is one ValueError that names the path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward plugin path {path!r} must look like 'pkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing to import
        raise ValueError(f"reward plugin {path!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward plugin {path!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward plugin {path!r}: {attr!r} is not callable")
    return target


@dataclass(frozen=True)
class ResolvedReward:
    """What a worker process needs to rebuild one reward: an importable target and its params."""

    name: str
    target: Callable[..., Any]
    params: dict = field(default_factory=dict)
    as_factory: bool = True

    def instantiate(self) -> RewardFn:
        """The reward callable (built-in factory or plugin factory called with params)."""
        if not self.as_factory:
            return self.target
        try:
            reward = self.target(**self.params)
        except TypeError as exc:
            raise ValueError(f"reward {self.name!r}: bad params {sorted(self.params)}: {exc}") from None
        if not callable(reward):
            raise ValueError(f"reward {self.name!r}: its factory returned {type(reward).__name__}, not a callable")
        return reward


def resolve_reward(name: str, params: dict | None = None) -> ResolvedReward:
    """Look a reward up by registry name or plugin path; unknown names list the known ones."""
    params = dict(params or {})
    if ":" in name:
        target = import_plugin(name)
        return ResolvedReward(name=name, target=target, params=params, as_factory=bool(params))
    if name not in _REWARD_FACTORIES:
        raise ValueError(
            f"unknown reward {name!r}; known rewards: {', '.join(known_reward_names())} "
            "(or a plugin as 'pkg.module:function')"
        )
    return ResolvedReward(name=name, target=_REWARD_FACTORIES[name], params=params, as_factory=True)


def build_reward(name: str, **params: Any) -> RewardFn:
    """The reward callable for a name or plugin path, for in-process use."""
    return resolve_reward(name, params).instantiate()


@dataclass(frozen=True)
class RewardSpec:
    """One configured reward and how the manager treats its values.

    name: registry name or plugin path. weight: factor in the weighted total. params: factory keywords.
    label: the metric key (``reward/<label>/...``); defaults to the name, or the plugin's function name.
    on_none: what a None (skipped sample) adds to the total -- a number (``weight * on_none``), or
      "exclude": adds nothing and marks the sample in ``RewardBatchResult.excluded`` so the trainer can
      drop it from the loss (TRL's nansum behaviour is on_none=0.0).
    on_error / on_timeout: the value a sample gets when its reward call raised / ran past the timeout.
    timeout_s: per-call limit for this reward (None = the manager's).
    """

    name: str
    weight: float = 1.0
    params: dict = field(default_factory=dict)
    label: str | None = None
    on_none: float | str = 0.0
    on_error: float = 0.0
    on_timeout: float = 0.0
    timeout_s: float | None = None

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        return self.name.rpartition(":")[2].rpartition(".")[2] if ":" in self.name else self.name

    def validate(self) -> None:
        if self.on_none != "exclude" and not isinstance(self.on_none, (int, float)):
            raise ValueError(f"reward {self.key!r}: on_none must be a number or 'exclude', got {self.on_none!r}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"reward {self.key!r}: timeout_s must be positive, got {self.timeout_s}")

    @classmethod
    def from_config(cls, entry: Any) -> "RewardSpec":
        """Accept a RewardSpec, a name string, or a mapping with the dataclass's fields."""
        if isinstance(entry, RewardSpec):
            return entry
        if isinstance(entry, str):
            return cls(name=entry)
        if isinstance(entry, dict) or hasattr(entry, "items"):
            data = dict(entry.items())
            unknown = set(data) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"reward config {data.get('name')!r}: unknown fields {sorted(unknown)}")
            if "params" in data:
                data["params"] = dict(data["params"] or {})
            return cls(**data)
        raise ValueError(f"a reward config must be a name, a mapping or a RewardSpec, got {type(entry).__name__}")
