"""Benchmark: our chunked vocab-parallel logprobs vs the naive full-vocab path, forward + backward.

    python bench/logprobs.py                       # CPU: 2 x 1024 tokens, V in {32k, 152k}, fp32
    python bench/logprobs.py --tokens 16384 --dtype bfloat16      # on a GPU

Methods (single rank, i.e. TP=1 with the whole vocabulary on this device):

* ``naive``: TRL's ``selective_log_softmax`` path: ``logits.float() / T -> log_softmax -> gather``;
  autograd keeps the fp32 ``[N, V]`` log-softmax for backward and materialises more ``[N, V]``
  buffers in backward;
* ``ours``: ``vocab_parallel_logprobs`` (chunked forward, backward recomputes per chunk), with the
  gradient written to a fresh ``[N, V]`` buffer;
* ``ours-inplace``: the same with ``inplace_backward=True`` (the gradient reuses the logits'
  storage), which is what the training step uses.

The logits ``[N, V]`` requiring grad exist before the measurement (they are the model's output in
every method); "peak" is the extra memory above that, over forward + backward, until the gradient
w.r.t. the logits exists. CPU: each (case, method) runs in a fresh subprocess and peak = ru_maxrss
minus the resident set size just before the call (torch's CPU allocator returns large blocks to
the OS, so RSS follows live tensors). GPU: ``torch.cuda.max_memory_allocated`` minus the allocated
bytes before the call. Time: median of ``--repeats`` runs after the measured one. Numbers are
printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(method: str, tokens: int, vocab: int, dtype_name: str, repeats: int, chunk_size, temperature: float) -> dict:
    """Executed in a child process: measure one (case, method)."""
    import torch

    sys.path.insert(0, str(REPO))
    from megatron_grpo.models.logprobs import naive_logprobs, vocab_parallel_logprobs

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=g, device=dev, dtype=dtype).mul_(3).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=dev)

    def run():
        logits.grad = None
        if method == "naive":
            lp = naive_logprobs(logits, targets, temperature=temperature)
        else:
            x = logits.view_as(logits)  # a non-leaf view: the in-place variant may reuse its storage
            lp = vocab_parallel_logprobs(x, targets, temperature=temperature, chunk_size=chunk_size,
                                         inplace_backward=(method == "ours-inplace"))
        lp.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        return lp

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    lp = run()
    first = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        stale = 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        stale = max(0, hwm_before - base)  # an older high-water mark above the baseline hides part of the peak
    checksum = float(lp.double().sum())
    times = []
    for _ in range(repeats):
        if method == "ours-inplace":  # the previous backward overwrote the logits: restore values
            with torch.no_grad():
                logits.copy_(torch.randn(tokens, vocab, generator=g.manual_seed(0), device=dev, dtype=dtype).mul_(3))
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"method": method, "tokens": tokens, "vocab": vocab, "dtype": dtype_name, "device": str(dev),
            "peak_bytes": int(peak), "hidden_by_old_hwm_bytes": int(stale), "time_s": statistics.median(times),
            "first_time_s": first, "logits_bytes": logits.numel() * logits.element_size(), "checksum": checksum}


def _child(args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {args}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--methods", nargs="+", default=["naive", "ours", "ours-inplace"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: 32M-element chunks)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_run_one(**json.loads(a.child))))
        return 0

    rows = []
    print(f"device={'cuda' if cuda else 'cpu'} tokens={a.tokens} dtype={a.dtype} TP=1 (full vocab on one device)")
    print(f"{'V':>7} {'method':>13} {'peak MiB':>9} {'time s':>8} {'peak/naive':>10} {'time/naive':>10}")
    for vocab in a.vocab:
        by_method = {}
        for method in a.methods:
            r = _child(dict(method=method, tokens=a.tokens, vocab=vocab, dtype_name=a.dtype, repeats=a.repeats,
                            chunk_size=a.chunk_size, temperature=a.temperature))
            by_method[method] = r
            rows.append(r)
        naive = by_method.get("naive")
        for method, r in by_method.items():
            if naive:
                r["peak_ratio"] = r["peak_bytes"] / max(naive["peak_bytes"], 1)
                r["time_ratio"] = r["time_s"] / naive["time_s"]
                r["checksum_diff"] = abs(r["checksum"] - naive["checksum"])
            pr = f"{r['peak_ratio']:.3f}" if "peak_ratio" in r else "-"
            tr = f"{r['time_ratio']:.3f}" if "time_ratio" in r else "-"
            print(f"{vocab:>7} {method:>13} {r['peak_bytes'] / 2**20:>9.1f} {r['time_s']:>8.3f} {pr:>10} {tr:>10}")
            if r["hidden_by_old_hwm_bytes"]:
                print(f"{'':>7} {'':>13} note: {r['hidden_by_old_hwm_bytes'] / 2**20:.0f} MiB of an earlier "
                      "RSS high-water mark lay above the baseline; the peak may be understated by that much")
        print(f"{'':>7} logits tensor itself: {naive['logits_bytes'] / 2**20 if naive else 0:.0f} MiB "
              f"(not counted); sum of logprobs differs from naive by "
              f"{max((r.get('checksum_diff', 0.0) for r in by_method.values()), default=0.0):.2e}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
