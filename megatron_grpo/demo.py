"""`make demo`: the embedded default, end to end on CPU, and whether GRPO made the model right more often.

1. Generate locally (configs/grpo_demo_cpu.yaml): the synthetic task "Largest of 3 8 1 5 9?"
   (data.synthetic_task=largest) and a tiny Qwen2-style model + tokenizer, then an explicit
   supervised warm start (model.warm_start_steps) whose answers are a random number of the prompt
   (model.warm_start_answer=prompt_number): it teaches the <think>/<answer> format and to answer with
   one of the given numbers, not which one is right (so it is right about 1 time in 5).
2. Evaluate that starting model on held-out prompts with vLLM (`megatron-grpo eval`).
3. GRPO (`megatron-grpo train --config configs/grpo_demo_cpu.yaml`): vLLM rollouts, math-verify and
   format rewards, megatron-core policy, weight sync every step; exports an HF model at the end.
4. Evaluate the exported model on the same held-out prompts; print the training curves (reward,
   accuracy) and the before/after table (reward, format, accuracy, pass@1, pass@k).

Usage: python -m megatron_grpo.demo [key=value overrides for the config]
Exit status 0 when the run completed and learned (held-out pass@1 after GRPO >= 3x before and
>= 0.30), 1 otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_demo_cpu.yaml"


def _cli(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "megatron_grpo.cli", *args]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"demo: `{' '.join(args[:3])} ...` failed (exit {proc.returncode}); log {log}:\n"
                         + "\n".join(tail))


def _train_streaming(args: list[str], log: Path) -> None:
    """Run training, echoing the trainer's own progress lines as they come."""
    cmd = [sys.executable, "-m", "megatron_grpo.cli", "train", *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("[megatron-grpo]") or line.startswith("error:"):
                print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo: training failed (exit {rc}); full log: {log}")


PASS1_GAIN, PASS1_MIN = 3.0, 0.30  # the verdict: held-out pass@1 after GRPO >= 3x before and >= 0.30


def curves(rows: list[dict], width: int = 40, points: int = 15) -> str:
    """Training reward (format + accuracy, max 2) and accuracy, averaged over windows of steps."""
    size = max(1, -(-len(rows) // points))
    lines = [f"  {'steps':>9}  {'reward':>6}  {'acc':>5}  accuracy"]
    for i in range(0, len(rows), size):
        win = rows[i:i + size]
        reward = sum(r["reward/mean"] for r in win) / len(win)
        acc = sum(r.get("reward/accuracy/mean", 0.0) for r in win) / len(win)
        lines.append(f"  {win[0]['step']:4d}-{win[-1]['step']:<4d}  {reward:6.3f}  {acc:5.3f}  {'#' * round(acc * width)}")
    return "\n".join(lines)


def learned(initial: dict, final: dict) -> bool:
    before, after = initial["eval/pass@1"], final["eval/pass@1"]
    return after >= PASS1_MIN and after >= PASS1_GAIN * before


def held_out_eval_args(cfg) -> list[str]:
    """`megatron-grpo eval` arguments: the test split, sampled as in training (also bench/demo_control.py)."""
    return ["--data", str(cfg.data.path), "--num-generations", str(cfg.trainer.eval_num_generations),
            "--max-new-tokens", str(cfg.rollout.max_new_tokens), "--temperature", str(cfg.rollout.temperature),
            "--rewards", ",".join(r.name for r in cfg.rewards.functions),
            "--system-prompt", "none" if cfg.data.system_prompt is None else "default"]


def main(argv: list[str] | None = None) -> int:
    from megatron_grpo.config import load_config, validate
    from megatron_grpo.trainer.assets import prepare_assets

    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(CONFIG, overrides)
    validate(cfg)
    out = Path(cfg.trainer.output_dir)
    run_dir = out / "demo_run"
    t0 = time.monotonic()
    print(f"demo: 1/4 preparing data ({cfg.data.path}) and the warm-started tiny model ({cfg.model.path})", flush=True)
    prepare_assets(cfg)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from its starting model
    run_dir.mkdir(parents=True)
    eval_args = held_out_eval_args(cfg)
    print("demo: 2/4 evaluating the starting model on held-out prompts (vLLM)", flush=True)
    _cli("eval", "--model", str(cfg.model.path), *eval_args, "--out", str(run_dir / "eval_initial.json"),
         log=run_dir / "eval_initial.log")
    print(f"demo: 3/4 GRPO training ({cfg.trainer.max_steps} steps; vLLM rollouts, megatron-core policy)", flush=True)
    _train_streaming(["--config", str(CONFIG), *overrides, f"trainer.output_dir={run_dir}",
                      "checkpoint.resume=none"], log=run_dir / "train.log")
    print("demo: 4/4 evaluating the exported model on the same held-out prompts", flush=True)
    _cli("eval", "--model", str(run_dir / "export_hf"), *eval_args, "--out", str(run_dir / "eval_final.json"),
         log=run_dir / "eval_final.log")
    return report(run_dir, elapsed=time.monotonic() - t0)


def report(run_dir: Path, *, elapsed: float) -> int:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    initial = json.loads((run_dir / "eval_initial.json").read_text())
    final = json.loads((run_dir / "eval_final.json").read_text())
    print("\ntraining curves (reward = format + accuracy, max 2; acc = share of correct samples):")
    print(curves(rows))
    n = int(initial.get("eval/num_prompts", 0))
    print(f"\nheld-out prompts ({n}, never trained on)   before GRPO   after GRPO")
    for key in ("eval/reward_mean", "eval/reward/format", "eval/accuracy", "eval/pass@1", "eval/pass@2",
                "eval/pass@4", "eval/pass@8"):
        if key in initial and key in final:
            print(f"  {key:37s} {initial[key]:11.3f}   {final[key]:10.3f}")
    ok = learned(initial, final)
    print(f"\ndemo: {'learned' if ok else 'did NOT learn enough'} (pass@1 {initial['eval/pass@1']:.3f} -> "
          f"{final['eval/pass@1']:.3f}; needs >= {PASS1_GAIN:g}x and >= {PASS1_MIN:.2f}); {elapsed / 60:.1f} min; "
          f"exported model: {run_dir / 'export_hf'}; metrics: {run_dir / 'metrics.jsonl'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
