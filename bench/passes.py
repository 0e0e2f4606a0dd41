"""Benchmark: what the on-policy shortcut and token-budget micro-batches save in the trainer's passes.

    python bench/passes.py                              # the ~56M Qwen2 model of bench/step.py --size small
    python bench/passes.py --rows 32 --max-tokens 1024 --repeats 2

One process, one rank (gloo world of 1), fp32, ``torch`` threads = 1, a long-tailed batch (prompt 40
tokens; completion lengths geometric with mean 30, capped at 128, so most are short and a few reach
the cap). It times, in CPU seconds of this process (``time.process_time``; on a machine shared with
other work that is far steadier than wall time, which is printed too):

* ``old pass + train`` (the separate old-policy logprob pass, then one GRPO update) vs ``train``
  alone with the shortcut (old logprobs = the training forward's own), fixed micro-batches;
* fixed micro-batches (``--micro-batch`` rows padded to the batch's longest row) vs token-budget
  micro-batches (``--max-tokens``), for the logprob pass and the update, with the padding fraction;
* model FLOP/s of the update (6 N per real token) against the fp32 GEMM peak of one thread, measured
  in the same run (CPU time of ``torch.mm`` 1024^3).
Numbers are printed, never asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _gemm_peak() -> float:
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(10):
        t = time.process_time()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / max(time.process_time() - t, 1e-9))
    return best


def _batch(rows, vocab, seed=0):
    import torch

    from megatron_grpo.training.batch import GRPOBatch

    g = torch.Generator().manual_seed(seed)
    prompt, cap = 40, 128
    lens = (torch.distributions.Geometric(probs=torch.tensor(1 / 30)).sample((rows,)) + 1).clamp(max=cap).long()
    lens[0] = cap  # at least one row reaches the maximum, as with real long-tailed traces
    t = prompt + int(lens.max())
    ids = torch.randint(1, vocab, (rows, t), generator=g)
    mask = torch.zeros(rows, t)
    for r in range(rows):
        mask[r, prompt : prompt + int(lens[r])] = 1
        ids[r, prompt + int(lens[r]) :] = 0
    return GRPOBatch(input_ids=ids, completion_mask=mask, advantages=torch.randn(rows, generator=g),
                     ref_logprobs=-2.0 * mask, rollout_logprobs=-2.0 * mask), lens


def _timed(fn):
    w, c = time.monotonic(), time.process_time()
    out = fn()
    return out, time.process_time() - c, time.monotonic() - w


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "runs" / "bench_small" / "model"))
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not reported")
    a = p.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    torch.set_num_threads(1)
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.models.loader import load_hf_weights
    from megatron_grpo.models.logprobs import compute_logprobs
    from megatron_grpo.models.provider import build_gpt_model, load_model_info, transformer_config
    from megatron_grpo.platform import setup_platform
    from megatron_grpo.training import GRPOTrainStep, build_optimizer, wrap_model_for_training
    from megatron_grpo.training.token_budget import row_lengths

    setup_platform()
    init_distributed(tp=1, pp=1, seed=0)
    info = load_model_info(a.model)
    model = build_gpt_model(info, transformer_config(info, tp=1, pp=1))
    load_hf_weights([model], a.model, info)
    n_flop = sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n)
    ddp = wrap_model_for_training([model])
    opt = build_optimizer(ddp, lr=1e-6, clip_grad=1.0)
    batch, lens = _batch(a.rows, info.vocab_size)
    real = sum(row_lengths(batch.completion_mask))
    peak = _gemm_peak()
    print(f"[passes] {n_flop / 1e6:.1f}M params with per-token FLOPs; {a.rows} rows, completion lengths "
          f"mean {lens.float().mean():.1f} max {int(lens.max())} (T={batch.seq_length}); {real} real tokens; "
          f"fp32 GEMM peak (1 thread, CPU time) {peak / 1e9:.1f} GFLOP/s; load {os.getloadavg()[0]:.1f}", flush=True)

    lp_kw = dict(micro_batch_size=a.micro_batch, temperature=1.0, vocab_size=info.vocab_size)
    results = {}

    def run(name, max_tokens, shortcut):
        step = GRPOTrainStep(ddp, opt, micro_batch_size=a.micro_batch, vocab_size=info.vocab_size,
                             loss=dict(kl_coef=0.04, is_level="token"), max_tokens_per_microbatch=max_tokens)
        b = batch.select(slice(None))
        (old, c_old, w_old) = _timed(lambda: None if shortcut else compute_logprobs(ddp, b.input_ids, b.completion_mask,
                                                                                    max_tokens=max_tokens, **lp_kw))
        b.old_logprobs = old
        m, c_tr, w_tr = _timed(lambda: step(b))
        return {"old_cpu": c_old, "old_wall": w_old, "train_cpu": c_tr, "train_wall": w_tr,
                "padding": m["padding_frac"], "mbs": m["num_microbatches"]}

    cases = [("fixed, separate old pass", None, False), ("fixed, shortcut", None, True),
             (f"budget {a.max_tokens}, separate old pass", a.max_tokens, False),
             (f"budget {a.max_tokens}, shortcut", a.max_tokens, True)]
    for r in range(a.warmup + a.repeats):  # the first a.warmup rounds warm up
        for name, mt, sc in (cases if r % 2 else cases[::-1]):
            res = run(name, mt, sc)
            if r >= a.warmup:
                results.setdefault(name, []).append(res)
            print(f"[passes] round {r} {name}: {res}  (load {os.getloadavg()[0]:.1f})", flush=True)

    print(f"\n{'case':<36}{'old pass cpu s':>16}{'train cpu s':>14}{'total cpu s':>14}{'wall s':>10}"
          f"{'padding':>9}{'mb':>5}{'train GFLOP/s':>15}{'of peak':>9}")
    for name, rows in results.items():
        med = {k: sorted(x[k] for x in rows)[len(rows) // 2] for k in rows[0]}
        gf = 6 * n_flop * real / med["train_cpu"] / 1e9
        print(f"{name:<36}{med['old_cpu']:>16.2f}{med['train_cpu']:>14.2f}{med['old_cpu'] + med['train_cpu']:>14.2f}"
              f"{med['old_wall'] + med['train_wall']:>10.1f}{med['padding']:>9.3f}{int(med['mbs']):>5}"
              f"{gf:>15.2f}{gf / (peak / 1e9):>9.3f}")
    print(f"load now {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
