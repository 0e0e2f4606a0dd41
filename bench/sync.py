"""Weight-sync benchmark: bridge vs memcpy floor vs save-to-disk + reload, for several layouts.

For each (train TP, train PP, vLLM TP) layout, one torchrun launch builds a >= 100M-parameter
model (Megatron policy + colocated vLLM engine), perturbs the weights, and times in the same run:

* ``sync``: one full ``WeightBridge.sync()`` (after a warm-up sync, so the timed one is the
  steady-state per-step cost, on freshly changed weights);
* ``floor``: copying the same bytes once: each rank copies as many bytes as it hands to vLLM,
  between two preallocated buffers, all ranks at once (they share the cores as in the sync);
* ``naive``: the path the bridge replaces: gather the whole model as HF tensors on rank 0 with
  plain torch.distributed collectives (gloo here), write an HF safetensors checkpoint to disk, then
  every rank's vLLM ``reload_weights(weights_path=...)``.

Prints a table with ratios; targets: (1,1,1) sync <= 3x floor; every layout >= 5x faster than naive.
Peak extra memory of the sync (RSS sampling, see ``bridge/memory.py``) is reported per layout.

Usage: ``python bench/sync.py [--layouts 1,1,1 2,1,2 ...] [--hidden 1024 --layers 10] [--json out]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_LAYOUTS = ["1,1,1", "2,1,2", "2,1,1", "1,2,1", "2,2,2"]


class _Collector:
    """An engine-protocol sink that keeps every bucket on the driver rank (for the naive baseline)."""

    placement = "disaggregated"
    driver_rank = 0

    def __init__(self):
        self.tensors = {}

    def begin_weight_update(self):
        pass

    def load_bucket(self, weights):
        for name, t in weights:
            self.tensors[name] = t.detach().contiguous().clone()

    def end_weight_update(self, version=None):
        return version or 0


def _max_over_ranks(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_layout(model_dir: str, tp: int, pp: int, rollout_tp: int, bucket_mb: float, work_dir: str,
               trials: int = 3, pp_zero_copy: bool | None = None) -> dict:
    """Rank body (under torchrun): this rank's measurements. Each time is the max over ranks (the
    step waits for the slowest), and the min over ``trials`` (the machine is shared: noise only
    ever adds time)."""
    import torch.distributed as dist

    from megatron_grpo.bridge import WeightBridge
    from megatron_grpo.bridge.policy import build_policy, perturb_
    from megatron_grpo.distributed.init import init_distributed
    from megatron_grpo.rollout import ColocatedEngine, EngineConfig

    init_distributed(tp=tp, pp=pp, seed=1)
    engine = ColocatedEngine(EngineConfig(model=model_dir, tensor_parallel_size=rollout_tp, max_model_len=256,
                                          kv_cache_memory_bytes=32 << 20))
    model, info = build_policy(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    bridge = WeightBridge([model], engine, info, bucket_mb=bucket_mb, pp_zero_copy=pp_zero_copy)
    bridge.sync()  # warm-up: caches bucket metadata, first-touch of every buffer
    sync_s = sync_cpu = float("inf")
    for trial in range(trials):
        perturb_(model, seed=10 + trial, scale=1e-3)
        dist.barrier()
        c0 = time.process_time()
        stats = bridge.sync()
        sync_cpu = min(sync_cpu, _max_over_ranks(time.process_time() - c0))
        sync_s = min(sync_s, _max_over_ranks(stats.seconds))

    # memory: one more sync with RSS sampling (sampling costs CPU, so not the timed one)
    perturb_(model, seed=2, scale=1e-3)
    bridge.measure_memory = True
    peak = bridge.sync().peak_extra_bytes
    bridge.measure_memory = False

    # memcpy floor: the bytes this rank hands to vLLM, copied once, all ranks concurrently
    src = torch.empty(stats.bytes_loaded, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    floor_s = floor_cpu = float("inf")
    for _ in range(trials):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        dst.copy_(src)
        floor_cpu = min(floor_cpu, _max_over_ranks(time.process_time() - c0))
        floor_s = min(floor_s, _max_over_ranks(time.perf_counter() - t0))
    del src, dst

    # naive: full HF checkpoint on rank 0 -> disk -> every engine reloads from the folder
    from safetensors.torch import save_file

    ckpt = Path(work_dir) / f"naive-{tp}{pp}{rollout_tp}"
    naive_s = naive_cpu = float("inf")
    for _ in range(min(trials, 2)):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        collector = _Collector()
        WeightBridge([model], collector, info, bucket_mb=bucket_mb, shared_memory=False).sync()
        if dist.get_rank() == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
            save_file(collector.tensors, str(ckpt / "model.safetensors"))
            os.sync()
        del collector
        dist.barrier()
        engine.reload_from_path(str(ckpt))
        naive_cpu = min(naive_cpu, _max_over_ranks(time.process_time() - c0))
        naive_s = min(naive_s, _max_over_ranks(time.perf_counter() - t0))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"layout": [tp, pp, rollout_tp], "params": n_params * tp * pp if tp * pp > 1 else n_params,
            "bytes_loaded": stats.bytes_loaded, "buckets": stats.buckets, "sync_s": sync_s, "floor_s": floor_s,
            "naive_s": naive_s, "sync_cpu_s": sync_cpu, "floor_cpu_s": floor_cpu, "naive_cpu_s": naive_cpu,
            "peak_extra_mb": peak / 2**20,
            "bucket_mb": max(b.nbytes for b in bridge.buckets) / 2**20, "phases": stats.phase_seconds,
            "pp_zero_copy": bridge.pp_zero_copy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, help="TP,PP,ROLLOUT_TP triples")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--trials", type=int, default=3, help="timed repetitions (min is reported)")
    p.add_argument("--model-dir", default=None, help="reuse a model folder (else a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-pp-zero-copy", action="store_true",
                   help="PP moves through per-round shared-memory slots instead of reading other stages in place")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-sync-")  # the model (unless --model-dir) and the naive checkpoints
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: str) -> int:
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model
    from megatron_grpo.testing.torchrun import run_distributed

    model_dir = args.model_dir or str(Path(work) / "model")
    if not (Path(model_dir) / "config.json").exists():
        spec = TinyModelSpec(arch="qwen2", hidden_size=args.hidden, intermediate_size=args.ffn,
                             num_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, head_dim=64)
        make_tiny_model(model_dir, spec)
    rows = []
    for layout in args.layouts:
        tp, pp, rtp = (int(x) for x in layout.split(","))
        world = max(tp * pp, rtp)
        res = run_distributed("bench.sync:run_layout", world, timeout=1200,
                              kwargs={"model_dir": model_dir, "tp": tp, "pp": pp, "rollout_tp": rtp,
                                      "bucket_mb": args.bucket_mb, "work_dir": work, "trials": args.trials,
                                      "pp_zero_copy": False if args.no_pp_zero_copy else None})
        r = dict(res[0], peak_extra_mb=max(x["peak_extra_mb"] for x in res))
        rows.append(r)
        print(f"done {layout}: sync {r['sync_s']:.3f}s", file=sys.stderr, flush=True)

    print(f"\nmodel: {rows[0]['params'] / 1e6:.1f}M params (qwen2, fp32), bucket {args.bucket_mb:g} MB, "
          f"{os.cpu_count()} CPU cores")
    hdr = (f"{'TP,PP->vTP':<11} {'MB/rank':>8} {'sync s':>8} {'floor s':>8} {'naive s':>8} "
           f"{'sync/floor':>10} {'naive/sync':>10} {'cpu s/f':>8} {'cpu n/s':>8} {'peak+MB':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tp, pp, rtp = r["layout"]
        print(f"{f'{tp},{pp}->{rtp}':<11} {r['bytes_loaded'] / 2**20:>8.0f} {r['sync_s']:>8.3f} {r['floor_s']:>8.3f} "
              f"{r['naive_s']:>8.3f} {r['sync_s'] / r['floor_s']:>10.2f} {r['naive_s'] / r['sync_s']:>10.2f} "
              f"{r['sync_cpu_s'] / r['floor_cpu_s']:>8.2f} {r['naive_cpu_s'] / r['sync_cpu_s']:>8.2f} "
              f"{r['peak_extra_mb']:>8.0f}")
    base = next((r for r in rows if r["layout"] == [1, 1, 1]), None)
    ok_floor = base is None or base["sync_s"] <= 3 * base["floor_s"]
    ok_naive = all(r["naive_s"] >= 5 * r["sync_s"] for r in rows)
    print(f"targets: (1,1,1) sync <= 3x floor: {'met' if ok_floor else 'MISSED'}; "
          f"every layout >= 5x faster than save+reload: {'met' if ok_naive else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
