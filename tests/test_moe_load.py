"""MoE expert-load metrics (models/moe_load.py) against an independent per-token count."""
import math
import random

import torch

from megatron_grpo.models.moe_load import expert_load_counts, load_stats


def _maps(b, s, L, E, k, seed):
    """Routing maps ``[s * b, E]`` (megatron's token order [s, b]) and the chosen experts per (row, pos)."""
    rng = random.Random(seed)
    chosen = [[[rng.sample(range(E), k) for _ in range(s)] for _ in range(b)] for _ in range(L)]
    maps = []
    for layer in range(L):
        m = torch.zeros(s * b, E, dtype=torch.bool)
        for i in range(b):
            for p in range(s):
                m[p * b + i, chosen[layer][i][p]] = True
        maps.append(m)
    return maps, chosen


def test_counts_follow_token_order_and_skip_padding():
    b, s, L, E, k = 3, 7, 2, 4, 2
    maps, chosen = _maps(b, s, L, E, k, seed=1)
    lengths = [7, 3, 5]
    ref = torch.zeros(L, E, dtype=torch.float64)
    for layer in range(L):
        for i in range(b):
            for p in range(lengths[i]):
                for e in chosen[layer][i][p]:
                    ref[layer, e] += 1
    assert torch.equal(expert_load_counts(maps, b, lengths), ref)
    # sequence parallelism: this rank holds positions 4..6 of each row
    sp = [m.reshape(s, b, E)[4:].reshape(-1, E) for m in maps]
    ref_sp = torch.zeros(L, E, dtype=torch.float64)
    for layer in range(L):
        for i in range(b):
            for p in range(4, lengths[i]):
                for e in chosen[layer][i][p]:
                    ref_sp[layer, e] += 1
    assert torch.equal(expert_load_counts(sp, b, lengths, lo=4), ref_sp)
    # keep [b, s]: only these positions count (R3 leaves each row's last token unrecorded)
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[0, 6] = keep[2, 1] = False
    ref_keep = ref.clone()
    for layer in range(L):
        for i, p in ((0, 6), (2, 1)):
            for e in chosen[layer][i][p]:
                ref_keep[layer, e] -= 1
    assert torch.equal(expert_load_counts(maps, b, lengths, keep=keep), ref_keep)


def test_stats_balanced_collapsed_and_mixed():
    mx, mn, ent = load_stats(torch.tensor([[5.0, 5.0, 5.0, 5.0]], dtype=torch.float64))
    assert (mx, mn) == (0.25, 0.25) and abs(ent - 1.0) < 1e-12
    mx, mn, ent = load_stats(torch.tensor([[0.0, 9.0, 0.0, 0.0]], dtype=torch.float64))
    assert (mx, mn, ent) == (1.0, 0.0, 0.0)
    counts = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 4.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mx, mn, ent = load_stats(counts)  # the empty third layer is skipped
    h = [-sum(x / 10 * math.log(x / 10) for x in row) / math.log(4) for row in ([1, 2, 3, 4], [4, 4, 1, 1])]
    assert mx == 0.4 and mn == 0.1 and abs(ent - sum(h)) < 1e-12
