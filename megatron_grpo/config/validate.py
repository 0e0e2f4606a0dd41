"""Cross-field checks of a loaded config, run before any process group, model or engine starts.

Each check raises :class:`ConfigError` with one line naming the key(s), the value and what to do.
Model shape checks read only the model folder's config.json (or the tiny-model spec), so a bad
TP choice costs milliseconds, not a failed launch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from .loader import ConfigError

CHOICES = {
    "model.init": ("hf", "tiny"),
    "model.dtype": ("float32", "bfloat16"),
    "model.recompute": ("none", "selective", "full"),
    "model.use_transformer_engine": ("auto", "true", "false"),
    "rollout.placement": ("colocated", "disaggregated"),
    "rollout.async_steps": (0, 1),
    "algorithm.adv_scale": ("group", "batch", "none"),
    "algorithm.kl_kind": ("k1", "k2", "k3", "kl", "mse", "low_var_kl"),
    "algorithm.loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "algorithm.reference": ("copy", "swap", "none"),
    "algorithm.importance_sampling": (None, "token", "sequence"),
    "algorithm.policy_loss": ("ppo_clip", "gspo", "cispo"),
    "algorithm.routing_replay": ("none", "r2", "r3"),
    "data.on_bad_row": ("error", "skip"),
    "data.synthetic_task": ("arithmetic", "largest"),
    "model.warm_start_answer": ("gold", "prompt_number"),
    "optimizer.scheduler": ("constant", "linear", "cosine"),
    "logging.wandb_mode": ("online", "offline"),
}

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                           "Qwen2MoeForCausalLM")


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def model_shape(cfg: DictConfig) -> dict:
    """heads, kv heads, vocab, layers, architecture: from config.json, or the tiny spec if not made yet."""
    path = Path(cfg.model.path)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.path: {cfg_file} is not valid JSON ({e.msg} at line {e.lineno})") from None
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model.path: {cfg_file} has architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = int(hf["num_attention_heads"])
        return {
            "arch": arch,
            "heads": heads,
            "kv_heads": int(hf.get("num_key_value_heads") or heads),
            "vocab": int(hf["vocab_size"]),
            "layers": int(hf["num_hidden_layers"]),
            # transformers 5 saves Qwen3-MoE's count as num_local_experts (attribute_map); hub files say num_experts
            "experts": int(hf.get("num_experts") or hf.get("num_local_experts") or 0),
            "moe_ffn": int(hf.get("moe_intermediate_size") or 0),
        }
    if cfg.model.init == "tiny":
        t = cfg.model.tiny
        moe = str(t.arch).endswith("_moe")
        return {"arch": t.arch, "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads,
                "vocab": t.vocab_size, "layers": t.num_layers, "experts": t.num_experts if moe else 0,
                "moe_ffn": t.moe_intermediate_size if moe else 0}
    if not path.exists():
        raise ConfigError(f"model.path: {path} does not exist (an HF model folder with config.json is expected)")
    raise ConfigError(f"model.path: {path} has no config.json (is it an HF model folder?)")


def launcher_world_size(cfg: DictConfig) -> int | None:
    """The training world size. A rollout rank of a node-split job (GRPO_ROLE=rollout) has its own
    WORLD_SIZE; the training world's is GRPO_TRAIN_WORLD_SIZE there."""
    if cfg.parallel.world_size is not None:
        return int(cfg.parallel.world_size)
    env = os.environ.get("GRPO_TRAIN_WORLD_SIZE" if os.environ.get("GRPO_ROLE") == "rollout" else "WORLD_SIZE")
    return int(env) if env else None


def _check_rollout_role(cfg: DictConfig) -> None:
    """GRPO_ROLE=rollout (slurm/grpo_disaggregated.sh): the rank serves vLLM for a trainer elsewhere."""
    if os.environ.get("GRPO_ROLE") != "rollout":
        return
    r = cfg.rollout
    if r.placement != "disaggregated":
        raise ConfigError(f"GRPO_ROLE=rollout needs rollout.placement=disaggregated (got {r.placement!r})")
    world = os.environ.get("WORLD_SIZE")
    if world and world.isdigit() and int(world) % r.tp:
        raise ConfigError(f"rollout.tp={r.tp} does not divide the rollout world size {world}")


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            shown = ", ".join(repr(a) if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key}={value!r} is not one of: {shown}")


def _positive(cfg: DictConfig, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_output_dir(path: Path) -> None:
    """Writable output dir, checked without touching anything already there."""
    probe_parent = path
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir():
        raise ConfigError(f"trainer.output_dir: {probe_parent} exists and is not a directory")
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise ConfigError(f"trainer.output_dir: {probe_parent} is not writable")


def _check_rewards(cfg: DictConfig) -> None:
    """Unknown reward names and bad plugin paths fail here, listing what is known."""
    from omegaconf import OmegaConf

    from megatron_grpo.rewards import RewardSpec, resolve_reward

    if not cfg.rewards.functions:
        raise ConfigError("rewards.functions is empty: configure at least one reward (e.g. accuracy)")
    for i, entry in enumerate(cfg.rewards.functions):
        try:
            spec = RewardSpec.from_config(OmegaConf.to_container(entry, resolve=True))
            spec.validate()
            resolve_reward(spec.name, spec.params).instantiate()  # the factory checks its params
        except (ValueError, TypeError) as e:
            raise ConfigError(f"rewards.functions.{i}: {str(e).splitlines()[0]}") from None


def check_runtime_packages(cfg: DictConfig) -> None:
    """Packages the run itself needs on the training machines (not on a submit host that only plans)."""
    import importlib.util

    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true but the wandb package is not installed (pip install wandb, "
                          "or logging.wandb=false)")


def _check_policy_loss(a) -> None:
    """GSPO and CISPO clip with their own bounds (README "What the algorithm offers")."""
    if a.policy_loss == "gspo" and not (0 < a.gspo_clip_low < 1 and a.gspo_clip_high > 0):
        raise ConfigError(f"algorithm.gspo_clip_low={a.gspo_clip_low} must be in (0, 1) and "
                          f"algorithm.gspo_clip_high={a.gspo_clip_high} > 0")
    if a.policy_loss == "cispo":
        if a.cispo_clip_high <= 0 or (a.cispo_clip_low is not None and a.cispo_clip_low <= 0):
            raise ConfigError(f"algorithm.cispo_clip_high={a.cispo_clip_high} must be > 0 and "
                              f"algorithm.cispo_clip_low={a.cispo_clip_low} > 0 or null (no lower bound)")
        if a.dual_clip is not None:
            raise ConfigError(f"algorithm.dual_clip={a.dual_clip} does not apply to policy_loss=cispo "
                              "(its IS weight is already clipped); set algorithm.dual_clip=null")


def _check_experts(cfg: DictConfig, shape: dict) -> None:
    """Expert parallelism: ep divides the experts, expert TP (= tp) divides the expert FFN size."""
    ep, tp, experts = cfg.parallel.ep, cfg.parallel.tp, shape.get("experts", 0)
    if ep > 1 and not experts:
        raise ConfigError(f"parallel.ep={ep} but the model ({shape['arch']}) has no experts; use parallel.ep=1")
    if experts and experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide the model's {experts} experts")
    if ep > 1 and cfg.algorithm.get("max_tokens_per_microbatch"):
        # each DP rank plans its own token-budget micro-batches; the expert all-to-all needs the same
        # number of them on every rank of the EP group, or the ranks wait on each other forever
        raise ConfigError(f"algorithm.max_tokens_per_microbatch={cfg.algorithm.max_tokens_per_microbatch} with "
                          f"parallel.ep={ep}: token-budget micro-batches differ in number across the expert-parallel "
                          "ranks; use algorithm.micro_batch_size (max_tokens_per_microbatch=null) with EP")
    if experts and shape.get("moe_ffn", 0) % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's moe_intermediate_size {shape['moe_ffn']} "
                          "(expert tensor parallelism equals parallel.tp)")


def validate(cfg: DictConfig, *, check_paths: bool = True) -> dict:
    """Run every cross-field check; returns derived facts (model shape, world size, DP size)."""
    _check_choices(cfg)
    _positive(cfg, "parallel.tp", "parallel.pp", "parallel.ep", "rollout.tp", "rollout.max_new_tokens", "data.max_prompt_length",
              "algorithm.num_prompts_per_step", "algorithm.micro_batch_size", "algorithm.logprob_micro_batch_size",
              "algorithm.update_epochs", "algorithm.mini_batches", "optimizer.lr", "rewards.timeout_s",
              "rewards.num_workers", "parallel.timeout_s", "rollout.sync_bucket_mb", "rollout.kv_cache_memory_mb")
    _positive(cfg, "algorithm.kl_coef", "algorithm.entropy_coef", "optimizer.clip_grad", "optimizer.weight_decay",
              "trainer.eval_steps", "checkpoint.save_steps", "rollout.temperature", allow_zero=True)
    _positive(cfg, "trainer.log_every")
    _positive(cfg, "trainer.logprob_check_mean_abs", "trainer.logprob_check_ratio_outside",
              "trainer.logprob_check_tolerance", allow_zero=True)
    a, r = cfg.algorithm, cfg.rollout
    if r.num_generations < 2:
        raise ConfigError(f"rollout.num_generations={r.num_generations}: GRPO needs >= 2 completions per prompt "
                          "(group-relative advantages of a single completion are always 0)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    if a.ratio_clip_low <= 0 or a.ratio_clip_low >= 1 or a.ratio_clip_high <= 0:
        raise ConfigError(f"algorithm.ratio_clip_low={a.ratio_clip_low} must be in (0, 1) and "
                          f"algorithm.ratio_clip_high={a.ratio_clip_high} > 0")
    if a.dual_clip is not None and a.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip={a.dual_clip} must be > 1 (or null to disable)")
    _check_policy_loss(a)
    if r.async_steps and a.importance_sampling is None:
        raise ConfigError("rollout.async_steps=1 trains on samples one weight version old: set "
                          "algorithm.importance_sampling (token or sequence) to correct against the rollout's logprobs")
    if a.max_tokens_per_microbatch is not None and a.max_tokens_per_microbatch <= 0:
        raise ConfigError(f"algorithm.max_tokens_per_microbatch={a.max_tokens_per_microbatch} must be > 0 "
                          "(or null for fixed micro_batch_size micro-batches)")
    if a.routing_replay == "r3" and r.placement != "colocated":
        raise ConfigError("algorithm.routing_replay=r3 needs rollout.placement=colocated (the engine's routed "
                          f"experts are captured in-process), got {r.placement!r}")
    if a.routing_replay in ("r2", "r3") and cfg.model.recompute == "full" and cfg.parallel.pp > 1:
        raise ConfigError(f"algorithm.routing_replay={a.routing_replay} with model.recompute=full needs parallel.pp=1 (the "
                          "recomputed router would replay another micro-batch's experts under 1F1B)")
    if a.kl_coef > 0 and a.reference == "none":
        raise ConfigError(f"algorithm.reference=none needs algorithm.kl_coef=0 (got {a.kl_coef}); "
                          "use reference=copy or swap for a KL penalty")
    if not 0 <= cfg.optimizer.warmup_ratio < 1:
        raise ConfigError(f"optimizer.warmup_ratio={cfg.optimizer.warmup_ratio} must be in [0, 1)")
    if cfg.trainer.max_steps is None and cfg.trainer.epochs is None:
        raise ConfigError("set trainer.max_steps or trainer.epochs")
    if cfg.data.test_split is None and not 0 <= cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} must be in [0, 1)")
    _check_rewards(cfg)
    _check_rollout_role(cfg)

    if check_paths:  # hub ids -> local snapshots (downloads unless offline), before anything reads the paths
        from megatron_grpo.hub import resolve_hub_paths

        resolve_hub_paths(cfg)
    shape = model_shape(cfg) if check_paths or cfg.model.init == "tiny" else None
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if shape:
        if shape["heads"] % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the model's {shape['heads']} attention heads")
        if shape["kv_heads"] % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the model's {shape['kv_heads']} KV heads "
                              f"(Megatron shards whole query groups; use tp in "
                              f"{[d for d in range(1, shape['kv_heads'] + 1) if shape['kv_heads'] % d == 0]})")
        if shape["layers"] % pp:
            raise ConfigError(f"parallel.pp={pp} does not divide the model's {shape['layers']} layers")
        _check_experts(cfg, shape)
        if cfg.model.make_vocab_size_divisible_by <= 1 and shape["vocab"] % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide vocab size {shape['vocab']}; "
                              "set model.make_vocab_size_divisible_by (e.g. 128) to pad it")
    world = launcher_world_size(cfg)
    dp = None
    if world is not None:
        if world % (tp * pp):
            raise ConfigError(f"world size {world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
        dp = world // (tp * pp)
        if (world // pp) % (tp * cfg.parallel.ep):
            raise ConfigError(f"parallel.ep={cfg.parallel.ep}: world size {world} / parallel.pp {pp} is not divisible by "
                              f"parallel.tp x parallel.ep = {tp} x {cfg.parallel.ep} (experts are split within DP)")
        if r.placement == "colocated" and world % r.tp:
            raise ConfigError(f"rollout.tp={r.tp} does not divide the world size {world}")
        seqs = a.num_prompts_per_step * r.num_generations
        if seqs % (dp * a.mini_batches):
            raise ConfigError(
                f"algorithm.num_prompts_per_step x rollout.num_generations = {seqs} sequences do not split "
                f"evenly over data parallel {dp} x algorithm.mini_batches {a.mini_batches}")
    if check_paths:
        data_path = Path(cfg.data.path)
        if not cfg.data.synthetic and not data_path.exists() and (data_path.is_absolute() or cfg.data.path.startswith(".")):
            raise ConfigError(f"data.path: {data_path} does not exist")
        if cfg.model.init == "hf" and not (Path(cfg.model.path) / "config.json").is_file():
            model_shape(cfg)  # raises with the precise reason
        _check_output_dir(Path(cfg.trainer.output_dir))
    return {"model": shape, "world_size": world, "dp": dp}
