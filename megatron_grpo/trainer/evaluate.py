"""Evaluation through vLLM: mean reward, accuracy, pass@1 and unbiased pass@k on held-out prompts.

Used by the trainer every ``trainer.eval_steps`` (on the live engine, current weights) and by the
standalone ``megatron-grpo eval --model HF_DIR --data PATH`` (a fresh single-process engine).
Accuracy is the ``accuracy`` reward (math-verify) when configured, else any reward named like it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_grpo.trainer.eval_metrics import summarize_eval

EVAL_SEED_OFFSET = 1_000_000_007  # eval draws never coincide with a training step's seeds


def evaluate_prompts(engine, prompt_ids: list[list[int]], solutions: list[str], reward_manager, *,
                     sampling, seed: int, ks=(1,)) -> dict:
    """Generate ``sampling.n`` samples per prompt and score them. Returns eval/* metrics."""
    batch = engine.generate(prompt_ids, sampling, seed=EVAL_SEED_OFFSET + seed)
    n = sampling.n
    expanded = [s for s in solutions for _ in range(n)]
    result = reward_manager(batch.completion_texts, solutions=expanded,
                            completion_ids=batch.completion_token_ids)
    acc_key = "accuracy" if "accuracy" in result.rewards else next(
        (k for k in result.rewards if "acc" in k), None)
    correct_flat = ([bool(v is not None and v >= 1.0) for v in result.rewards[acc_key]] if acc_key
                    else [False] * len(expanded))
    correct = [correct_flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]
    totals = [result.total[i * n:(i + 1) * n] for i in range(len(prompt_ids))]
    summary = summarize_eval(correct, totals, ks=ks)
    for key, values in result.rewards.items():
        vals = [v for v in values if v is not None]
        if vals:
            summary[f"eval/reward/{key}"] = sum(vals) / len(vals)
    lengths = [len(c) for c in batch.completion_token_ids]
    summary["eval/completion_length"] = sum(lengths) / len(lengths)
    return summary


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="megatron-grpo eval", description="evaluate an HF model folder with vLLM")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--data", required=True, help="dataset path (json/jsonl/parquet/dir) or hub name")
    p.add_argument("--split", default="test")
    p.add_argument("--prompt-column", default="problem")
    p.add_argument("--solution-column", default="solution")
    p.add_argument("--num-generations", type=int, default=4, help="samples per prompt (pass@k for k <= this)")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--rewards", default="accuracy,format", help="comma-separated reward names")
    p.add_argument("--system-prompt", default="default", help="'default' (the seed's), 'none', or a text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the metrics as JSON here")
    return p.parse_args(argv)


def eval_main(argv: list[str]) -> int:
    args = _parse_args(argv)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model}: not an HF model folder (no config.json)")
    if args.num_generations < 1:
        raise ValueError(f"--num-generations must be >= 1, got {args.num_generations}")
    from transformers import AutoTokenizer

    from megatron_grpo.data.loading import load_prompt_dataset
    from megatron_grpo.data.prompts import SYSTEM_PROMPT, tokenize_prompts
    from megatron_grpo.rewards import RewardManager
    from megatron_grpo.rewards.registry import resolve_reward
    from megatron_grpo.rollout.types import SamplingConfig

    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()]
    for name in rewards:
        resolve_reward(name)  # unknown names fail now, listing the known ones
    splits = load_prompt_dataset(args.data, problem_column=args.prompt_column,
                                 solution_column=args.solution_column, train_split=args.split, test_split=None)
    dataset = splits.train
    if args.max_prompts:
        dataset = dataset.select(range(min(args.max_prompts, len(dataset))))
    system_prompt = {"default": SYSTEM_PROMPT, "none": None}.get(args.system_prompt, args.system_prompt)
    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset, _ = tokenize_prompts(dataset, tokenizer, system_prompt=system_prompt, split_name=args.split)

    from megatron_grpo.rollout.config import EngineConfig
    from megatron_grpo.rollout.engine import ColocatedEngine
    from megatron_grpo.trainer.components import context_length

    longest = max(len(p) for p in dataset["prompt_ids"]) + args.max_new_tokens
    engine = ColocatedEngine(EngineConfig(model=str(model), seed=args.seed, enable_sleep_mode=False,
                                          max_model_len=context_length(model, longest)))
    sampling = SamplingConfig(n=args.num_generations, temperature=args.temperature,
                              max_tokens=args.max_new_tokens, skip_special_tokens=True)
    ks = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.num_generations)
    with RewardManager(rewards, num_workers=1) as manager:
        summary = evaluate_prompts(engine, list(dataset["prompt_ids"]), list(dataset["solution"]), manager,
                                   sampling=sampling, seed=args.seed, ks=ks)
    summary = {"model": str(model), "data": args.data, **summary}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
