"""Training metrics that combine exactly across micro-batches and DP ranks.

A metric dict is flat: ``name -> 0-dim detached tensor``.  The key's suffix says
how to reduce it, so the caller needs no per-metric knowledge:

* ``*_sum``, ``*_sqsum``, ``*_count``: add (micro-batches, then ``all_reduce(SUM)``)
* ``*_min``: minimum (``ReduceOp.MIN``); identity ``+inf`` when nothing was seen
* ``*_max``: maximum (``ReduceOp.MAX``); identity ``-inf``

Averaging per-micro-batch means would weight a 3-token micro-batch like a
3000-token one; sums plus counts do not.  :func:`finalize_metrics` turns a reduced
dict into plain floats: ``X_sum / X_count -> X`` (mean), ``X_sqsum -> X_std``
(population std), ``X_sum`` without ``X_count -> X`` (a total), ``X_min`` /
``X_max`` as they are.  Metrics with no samples (count 0, infinite min/max) are
omitted rather than logged as NaN.
"""
from __future__ import annotations

import math

import torch

from ._common import as_bool_mask, compute_dtype

__all__ = [
    "metric_reduce_op",
    "combine_metrics",
    "pack_metrics",
    "unpack_metrics",
    "finalize_metrics",
    "masked_stats",
    "advantage_metrics",
]

_SUFFIX_OPS = (("_sqsum", "sum"), ("_sum", "sum"), ("_count", "sum"), ("_min", "min"), ("_max", "max"))


def metric_reduce_op(key):
    """``"sum"``, ``"min"`` or ``"max"``: how to reduce metric ``key`` (by its suffix)."""
    for suffix, op in _SUFFIX_OPS:
        if key.endswith(suffix):
            return op
    raise ValueError(f"metric key {key!r} has no reduction suffix (_sum/_sqsum/_count/_min/_max)")


def _reduce_pair(op, a, b):
    if op == "sum":
        return a + b
    return torch.minimum(a, b) if op == "min" else torch.maximum(a, b)


def combine_metrics(*metric_dicts):
    """Reduce several metric dicts (e.g. one per micro-batch) into one, key by key.

    Accepts dicts as arguments or a single list of dicts.  Keys missing from a dict
    are treated as that dict contributing nothing.
    """
    if len(metric_dicts) == 1 and not isinstance(metric_dicts[0], dict):
        metric_dicts = tuple(metric_dicts[0])
    out = {}
    for d in metric_dicts:
        for k, v in d.items():
            op = metric_reduce_op(k)
            v = torch.as_tensor(v).detach()
            if k in out:
                a, b = out[k], v.to(out[k].device)
                dtype = torch.promote_types(a.dtype, b.dtype)
                out[k] = _reduce_pair(op, a.to(dtype), b.to(dtype))
            else:
                out[k] = v
    return out


def pack_metrics(metrics):
    """Group a metric dict into one 1-D tensor per reduce op, for 3 collectives total.

    Returns ``{op: (keys, tensor)}`` with ``op`` in ``"sum"|"min"|"max"``; run
    ``all_reduce(tensor, op)`` on each (sorted keys, so every rank packs the same
    layout as long as the key sets match), then :func:`unpack_metrics`.
    """
    groups = {}
    for k in sorted(metrics):
        groups.setdefault(metric_reduce_op(k), []).append(k)
    packed = {}
    for op, keys in groups.items():
        vals = [torch.as_tensor(metrics[k]).detach().reshape(()) for k in keys]
        dtype = compute_dtype(*vals)
        device = vals[0].device
        packed[op] = (keys, torch.stack([v.to(device=device, dtype=dtype) for v in vals]))
    return packed


def unpack_metrics(packed):
    """Inverse of :func:`pack_metrics`: back to ``name -> 0-dim tensor``."""
    out = {}
    for keys, tensor in packed.values():
        for i, k in enumerate(keys):
            out[k] = tensor[i]
    return out


def finalize_metrics(metrics):
    """Reduced metric dict -> ``{name: float}`` of means, stds, totals, mins, maxes."""
    vals = {k: float(v) for k, v in metrics.items()}
    out = {}
    for k, v in vals.items():
        op = metric_reduce_op(k)
        if op in ("min", "max"):
            if math.isfinite(v):
                out[k] = v
            continue
        if k.endswith("_sqsum") or k.endswith("_count"):
            continue
        base = k[: -len("_sum")]
        count = vals.get(base + "_count")
        if count is None:
            out[base] = v
            continue
        if count <= 0:
            continue
        mean = v / count
        out[base] = mean
        sq = vals.get(base + "_sqsum")
        if sq is not None:
            out[base + "_std"] = math.sqrt(max(sq / count - mean * mean, 0.0))
    return out


def masked_stats(name, values, mask=None, *, moments=True, extrema=False):
    """Sum/count (and optionally ``_sqsum``, ``_min``, ``_max``) of ``values[mask]``.

    Booleans are counted as 0/1, so ``masked_stats("clip_frac", flags, mask)``
    finalizes to a fraction.  ``moments=False`` skips ``_sqsum``.
    """
    with torch.no_grad():
        values = torch.as_tensor(values).detach()
        dtype = compute_dtype(values)
        v = values.to(dtype)
        m = torch.ones_like(v, dtype=torch.bool) if mask is None else as_bool_mask(mask, v.shape)
        zero = torch.zeros((), dtype=dtype, device=v.device)
        out = {
            f"{name}_sum": torch.where(m, v, zero).sum(),
            f"{name}_count": m.sum().to(dtype),
        }
        if moments:
            out[f"{name}_sqsum"] = torch.where(m, v.square(), zero).sum()
        if extrema:
            inf = torch.full((), math.inf, dtype=dtype, device=v.device)
            out[f"{name}_min"] = torch.where(m, v, inf).amin() if v.numel() else inf
            out[f"{name}_max"] = torch.where(m, v, -inf).amax() if v.numel() else -inf
    return out


def advantage_metrics(advantages, mask=None, *, name="advantage"):
    """Mean/std/min/max of advantages, combinable across shards.

    ``advantages`` ``[B]`` counts each sequence once; with a ``[B, T]`` ``mask``
    only sequences with at least one valid token count.  ``[B, T]`` advantages are
    counted per valid token.  Finalizes to ``advantage``, ``advantage_std``,
    ``advantage_min``, ``advantage_max``.
    """
    adv = torch.as_tensor(advantages)
    if mask is not None and adv.dim() == 1:
        mask = as_bool_mask(mask, (adv.shape[0], mask.shape[-1])).any(dim=-1)
    return masked_stats(name, adv, mask, moments=True, extrema=True)
