"""What a rollout engine takes (sampling settings) and gives back (a grouped batch of completions).

Kept free of vLLM imports: the trainer, the reward code and tests use these types without paying the
~12 s vLLM import. Completions are stored flat with G contiguous entries per prompt (GRPO groups),
which is the order the advantage code expects.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingConfig:
    """Per-step sampling settings; mirrors the NeMo-RL/veRL/TRL knobs users already set.

    ``n`` is the GRPO group size G. ``top_k=0`` and ``top_p=1.0`` disable those filters (vLLM's
    convention). ``stop`` strings and ``stop_token_ids`` end a completion with finish reason
    "stop" like EOS does.
    """

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = True
    ignore_eos: bool = False
    skip_special_tokens: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n (group size) must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (greedy decoding has no sampling logprobs to train on)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def prompt_seed(step_seed: int, prompt_index: int, group_size: int) -> int:
    """The vLLM request seed for one prompt of one step.

    vLLM gives child j of a request with ``seed=s`` the seed ``s + j``, so prompts are spaced by
    the group size: every completion of the step has its own seed, and the seed depends only on
    (step seed, global prompt index), never on how prompts were split across rollout replicas.
    """
    return (int(step_seed) * 1_000_003 + int(prompt_index) * int(group_size)) % (2**62)


@dataclass
class RolloutBatch:
    """Completions of one rollout step, G contiguous entries per prompt, in prompt order.

    All per-completion lists have length ``num_prompts * group_size``. ``rollout_logprobs[i][t]``
    is vLLM's processed logprob (log_softmax(logits / T)) of ``completion_token_ids[i][t]``.
    ``weight_version`` is the engine's weight version when the batch was generated (off-policy
    checks). ``prompt_indices[i]`` is the global index of completion i's prompt.
    """

    group_size: int
    prompt_indices: list[int] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    completion_token_ids: list[list[int]] = field(default_factory=list)
    completion_texts: list[str] = field(default_factory=list)
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    weight_version: int = 0
    # R3 (MoE, optional: empty unless the engine captures): [P + C - 1, layers, k] int16 experts vLLM chose
    routed_experts: list = field(default_factory=list)

    _PER_COMPLETION = (
        "prompt_indices", "prompt_token_ids", "completion_token_ids", "completion_texts",
        "rollout_logprobs", "finish_reasons", "routed_experts",
    )
    _OPTIONAL = ("routed_experts",)

    def __post_init__(self):
        self.validate()

    def __len__(self) -> int:
        return len(self.completion_token_ids)

    @property
    def num_prompts(self) -> int:
        return len(self) // self.group_size if self.group_size else 0

    def validate(self) -> None:
        n = len(self.completion_token_ids)
        for name in self._PER_COMPLETION:
            if name in self._OPTIONAL and not getattr(self, name):
                continue
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.group_size < 1 or n % self.group_size:
            raise ValueError(f"{n} completions do not form groups of {self.group_size}")
        for i in range(0, n, self.group_size):
            if len(set(self.prompt_indices[i:i + self.group_size])) != 1:
                raise ValueError(f"completions {i}..{i + self.group_size - 1} are not one prompt's group")
        for i, (toks, lps) in enumerate(zip(self.completion_token_ids, self.rollout_logprobs)):
            if len(toks) != len(lps):
                raise ValueError(f"completion {i}: {len(toks)} tokens but {len(lps)} logprobs")
        bad = set(self.finish_reasons) - set(FINISH_REASONS)
        if bad:
            raise ValueError(f"unknown finish reasons {bad}")

    @classmethod
    def concat(cls, batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """Concatenate batches (e.g. per-replica results) and sort groups by prompt index."""
        batches = [b for b in batches if b is not None]
        if not batches:
            raise ValueError("nothing to concatenate")
        g = batches[0].group_size
        if any(b.group_size != g for b in batches):
            raise ValueError("batches have different group sizes")
        groups = []
        for b in batches:
            for start in range(0, len(b), g):
                groups.append((b.prompt_indices[start], b, start))
        groups.sort(key=lambda x: x[0])
        out = {name: [] for name in cls._PER_COMPLETION}
        for _, b, start in groups:
            for name in cls._PER_COMPLETION:
                out[name].extend(getattr(b, name)[start:start + g])
        return cls(group_size=g, weight_version=min(b.weight_version for b in batches), **out)

    def shard(self, rank: int, size: int) -> "RolloutBatch":
        """Whole prompt groups for data-parallel rank ``rank`` of ``size`` (contiguous blocks).

        Groups are never split, so group advantages can be computed locally on each DP rank.
        """
        if self.num_prompts % size:
            raise ValueError(f"{self.num_prompts} prompts do not split across {size} DP ranks")
        per = self.num_prompts // size
        lo, hi = rank * per * self.group_size, (rank + 1) * per * self.group_size
        return RolloutBatch(
            group_size=self.group_size, weight_version=self.weight_version,
            **{name: getattr(self, name)[lo:hi] for name in self._PER_COMPLETION},
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
