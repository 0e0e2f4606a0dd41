"""`make demo`: the embedded default, end to end on CPU, and whether it learned.

1. Generate locally: a synthetic arithmetic dataset and a tiny Qwen2-style model + tokenizer, then a
   short explicit SFT warm start (14 steps) so the random model can earn some format reward at all
   (configs/grpo_tiny_cpu.yaml: model.init=tiny, model.warm_start_steps).
2. Evaluate that starting model on held-out prompts with vLLM (`megatron-grpo eval`).
3. GRPO (`megatron-grpo train --config configs/grpo_tiny_cpu.yaml`): vLLM rollouts, math-verify and
   format rewards, megatron-core policy, weight sync every step; exports an HF model at the end.
4. Evaluate the exported model on the same held-out prompts; print the reward curve and verdict.

Usage: python -m megatron_grpo.demo [key=value overrides for the config]
Exit status 0 when the run completed and learned (last-10-step mean reward >= 2x the first 10, and
the exported model beats the starting one on held-out prompts), 1 otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_tiny_cpu.yaml"


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


def reward_curve(rows: list[dict], width: int = 50) -> str:
    lines = []
    for r in rows:
        v = r["reward/mean"]
        bar = "#" * int(round(v / 2.0 * width))  # format + accuracy: total reward in [0, 2]
        lines.append(f"  step {r['step']:3d}  {v:5.3f}  {bar}")
    return "\n".join(lines)


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
    n_eval = str(cfg.trainer.eval_num_generations)
    eval_args = ["--data", str(cfg.data.path), "--num-generations", n_eval, "--max-new-tokens",
                 str(cfg.rollout.max_new_tokens), "--temperature", str(cfg.rollout.temperature),
                 "--rewards", ",".join(r.name for r in cfg.rewards.functions),
                 "--system-prompt", "none" if cfg.data.system_prompt is None else "default"]
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
    first = sum(r["reward/mean"] for r in rows[:10]) / len(rows[:10])
    last = sum(r["reward/mean"] for r in rows[-10:]) / len(rows[-10:])
    initial = json.loads((run_dir / "eval_initial.json").read_text())
    final = json.loads((run_dir / "eval_final.json").read_text())
    print("\nreward per step (total = format + accuracy, max 2):")
    print(reward_curve(rows))
    ratio = last / first if first > 0 else float("inf")
    print(f"\nmean reward, first 10 steps {first:.3f} -> last 10 steps {last:.3f} ({ratio:.2f}x)")
    print("held-out prompts        starting model   exported model")
    for key in ("eval/reward_mean", "eval/reward/format", "eval/reward/accuracy", "eval/pass@1"):
        if key in initial and key in final:
            print(f"  {key:22s} {initial[key]:14.3f}   {final[key]:14.3f}")
    learned = ratio >= 2.0 and final["eval/reward_mean"] > initial["eval/reward_mean"]
    print(f"\ndemo: {'learned' if learned else 'did NOT learn enough'}; {elapsed / 60:.1f} min; "
          f"exported model: {run_dir / 'export_hf'}; metrics: {run_dir / 'metrics.jsonl'}")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
