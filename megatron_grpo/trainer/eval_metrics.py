"""Evaluation statistics over G samples per prompt: pass@1 and unbiased pass@k."""
from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples of which c are correct."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize_eval(correct: list[list[bool]], rewards: list[list[float]], ks=(1,)) -> dict:
    """correct/rewards: per prompt, per sample. Returns mean reward, accuracy and pass@k for each k."""
    if not correct:
        raise ValueError("no evaluation prompts")
    n = len(correct[0])
    out = {
        "eval/reward_mean": sum(sum(r) for r in rewards) / sum(len(r) for r in rewards),
        "eval/accuracy": sum(sum(c) for c in correct) / sum(len(c) for c in correct),
        "eval/num_prompts": len(correct),
    }
    for k in ks:
        if k <= n:
            out[f"eval/pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct)
    return out
