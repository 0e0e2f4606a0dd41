"""Per-token logprobs (and entropy) from tensor-parallel logits without gathering the vocabulary.

GRPO needs ``log p(token)`` for every completion token, three times per step (policy, old policy,
reference). The textbook way (TRL's ``selective_log_softmax``) materialises fp32 ``[tokens, V]``
log-softmax outputs and keeps them for backward: at V = 152k and 8k tokens that is 5 GB per copy.
Here each TP rank only ever sees its own vocabulary shard ``[.., V/TP]`` and only a chunk of tokens
at a time:

* forward, per chunk of ``c`` tokens: the local log-sum-exp, the target logit (on the rank that owns
  the target id) and, for the entropy, ``sum p*x``, combined across the TP group with one MAX and
  one SUM all-reduce of ``[c]``-sized vectors; only ``[c]``-sized statistics are kept for backward;
* backward recomputes ``softmax - onehot`` chunk by chunk from the saved (unconverted) logits, so
  the graph never holds fp32 copies of the full logits. Extra peak memory is O(c x V/TP).

Conventions (what vLLM reports with ``logprobs_mode="processed_logprobs"``):

* logprobs are ``log_softmax(logits.float() / temperature)[target]`` in fp32;
* vocabulary rows with ids ``>= vocab_size`` (Megatron pads the embedding to a multiple of
  ``TP x make_vocab_size_divisible_by``) are excluded from the softmax, exactly as if they did not
  exist. ``vocab_size`` is the HF ``config.vocab_size`` (the model's rows; vLLM's softmax runs over
  those, not over the possibly smaller tokenizer);
* entropy is the entropy of that same tempered distribution.

Alignment (:func:`token_logprobs`, :func:`compute_logprobs`): for a row ``input_ids[b]`` the output
``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` for ``t >= 1`` (computed from the logits
at position ``t - 1``) and ``out[b, 0] = 0``. Output ``[B, T]`` is therefore aligned with the token
positions, so a completion mask over ``input_ids`` (1 at completion tokens) is directly the loss
mask. Positions outside ``mask`` are returned as 0 and cost nothing (their rows are skipped).

The TransformerEngine kernel (``backend="te"``) is faster but holds an fp32 copy of the local logits
for backward (its Triton kernel writes the gradient into its input, so we hand it a fresh copy);
it has no entropy. ``"auto"`` picks it only when TE imports and no entropy is asked for.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megatron_grpo.platform import detect

__all__ = [
    "vocab_parallel_logprobs",
    "token_logprobs",
    "naive_logprobs",
    "compute_logprobs",
    "default_chunk_size",
]

# fp32 elements of one chunk buffer (128 MiB); a handful of such buffers is the extra peak memory.
_CHUNK_ELEMENTS = 1 << 25
_BACKENDS = ("chunked", "te", "auto")


def default_chunk_size(local_vocab: int) -> int:
    """Tokens per chunk so that one fp32 chunk buffer holds about 32M elements."""
    return max(1, _CHUNK_ELEMENTS // max(int(local_vocab), 1))


def _tp_info(tp_group):
    """(group or None, world size, rank). ``None`` = Megatron's TP group if initialised, else 1 rank."""
    if tp_group is None and "megatron.core.parallel_state" in sys.modules:  # not imported: not initialised
        ps = sys.modules["megatron.core.parallel_state"]
        if ps.model_parallel_is_initialized():
            tp_group = ps.get_tensor_model_parallel_group()
    if tp_group is None or not dist.is_initialized():
        return None, 1, 0
    world = dist.get_world_size(group=tp_group)
    if world == 1:
        return None, 1, 0
    return tp_group, world, dist.get_rank(group=tp_group)


class _ChunkedLogprobs(torch.autograd.Function):
    """logits [N, Vl] (local shard) -> logprobs [M] (+ entropy [M]) for rows ``rows`` [M]."""

    @staticmethod
    def forward(ctx, logits, rows, targets, temperature, vocab_start, valid, group, chunk, with_entropy, inplace):
        device = logits.device
        m_rows = rows.numel()
        lp = torch.empty(m_rows, dtype=torch.float32, device=device)
        lse_all = torch.empty_like(lp)
        ent_all = torch.empty_like(lp) if with_entropy else None
        for s in range(0, m_rows, chunk):
            r = rows[s : s + chunk]
            x = _chunk_input(logits, r, valid, temperature)
            lse, tgt, neg_h = _local_stats(x, targets[s : s + chunk], vocab_start, valid, with_entropy)
            del x
            lse, tgt, ent = _combine_across_tp(lse, tgt, neg_h, valid, group)
            lp[s : s + chunk] = tgt - lse
            lse_all[s : s + chunk] = lse
            if with_entropy:
                ent_all[s : s + chunk] = ent
        ctx.save_for_backward(logits, rows, targets, lse_all, ent_all)
        ctx.cfg = (temperature, vocab_start, valid, chunk, inplace)
        if with_entropy:
            return lp, ent_all.clone()
        return lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_ent=None):
        logits, rows, targets, lse_all, ent_all = ctx.saved_tensors
        temperature, vocab_start, valid, chunk, inplace = ctx.cfg
        n, vl = logits.shape
        if inplace:
            # The logits are dead after this backward (documented contract): reuse their storage.
            out = logits.detach()
            if rows.numel() < n:
                untouched = torch.ones(n, dtype=torch.bool, device=out.device)
                untouched[rows] = False
                out[untouched] = 0
        else:
            out = torch.zeros_like(logits)
        if grad_lp is None:
            grad_lp = torch.zeros_like(lse_all)
        use_ent = grad_ent is not None and ent_all is not None
        for s in range(0, rows.numel(), chunk):
            r = rows[s : s + chunk]
            x = _chunk_input(logits, r, valid, temperature)
            g = grad_lp[s : s + chunk].float()
            # y = global log-softmax (all TP ranks), from the saved log-partition; p = softmax.
            y = x.sub_(lse_all[s : s + chunk, None])
            p = torch.exp(y)
            if use_ent:
                # d(lp)/dx = onehot - p ;  d(H)/dx = -p * (x - E_p[x]) = -p * (y + H)
                coef = y.add_(ent_all[s : s + chunk, None]).mul_(grad_ent[s : s + chunk, None].float())
                grad = p.mul_(coef.add_(g[:, None])).neg_()
            else:
                grad = p.mul_(g[:, None]).neg_()
            del x, y
            t = targets[s : s + chunk] - vocab_start
            own = (t >= 0) & (t < valid)
            if valid > 0:
                grad.scatter_add_(1, t.clamp(0, valid - 1)[:, None], torch.where(own, g, torch.zeros_like(g))[:, None])
            if temperature != 1.0:
                grad.div_(temperature)
            out[r, :valid] = grad.to(out.dtype)
            if valid < vl:
                out[r, valid:] = 0
            del grad, p
        return out, None, None, None, None, None, None, None, None, None


def _chunk_input(logits, r, valid, temperature):
    """fp32 tempered logits of rows ``r`` over the valid (non-padding) local columns: a fresh copy."""
    x = logits[r, :valid]  # advanced indexing: a copy of c rows only
    x = x.float() if x.dtype != torch.float32 else x
    if temperature != 1.0:
        x = x.div_(temperature)  # division, like vLLM (not a multiply by 1/T)
    return x


def _local_stats(x, t_global, vocab_start, valid, with_entropy):
    """Per-token local log-sum-exp, target logit (0 if another rank owns it) and, for the entropy,
    ``sum p_local * log p_local`` (minus the local entropy: small numbers, no cancellation)."""
    c = x.shape[0]
    if valid == 0:  # this rank holds only padding rows of the vocabulary
        z = torch.zeros(c, dtype=torch.float32, device=x.device)
        return torch.full_like(z, float("-inf")), z, (z if with_entropy else None)
    lse = torch.logsumexp(x, dim=-1)
    t = t_global - vocab_start
    own = (t >= 0) & (t < valid)
    tgt = x.gather(1, t.clamp(0, valid - 1)[:, None]).squeeze(1)
    tgt = torch.where(own, tgt, torch.zeros_like(tgt))
    neg_h = None
    if with_entropy:
        y = x.sub_(lse[:, None])  # x is a fresh copy and the target logit is already read
        neg_h = torch.exp(y).mul_(y).sum(-1)
    return lse, tgt, neg_h


def _combine_across_tp(lse, tgt, neg_h, valid, group):
    """Global log-partition, target logit and entropy from per-rank values (2 all-reduces).

    With ``w_r = exp(lse_r - m)`` (m = max_r lse_r) and ``Z = sum_r w_r``: ``lse = m + log Z`` and
    ``H = log Z - sum_r w_r (neg_h_r + lse_r - m) / Z``; every term is entropy-sized, so no
    cancellation between large logits.
    """
    if group is None:
        return lse, tgt, (None if neg_h is None else -neg_h)
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    w = torch.exp(lse - m)  # this rank's share of the partition function, times exp(-m)
    parts = [w, tgt]
    if neg_h is not None:
        # a pad-only rank (valid == 0) contributes nothing (and must not send 0 * -inf)
        parts.append(w * (neg_h + lse - m) if valid > 0 else torch.zeros_like(w))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    log_z = torch.log(stacked[0])
    ent = None if neg_h is None else log_z - stacked[2] / stacked[0]
    return m + log_z, stacked[1], ent


def _te_logprobs(logits, targets, temperature, vocab_start, valid, group):
    """TransformerEngine's fused vocab-parallel cross entropy (no entropy). Full fp32 copy held."""
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

    x = logits.float() / temperature if temperature != 1.0 else logits.float().clone()
    vl = x.shape[-1]
    if valid < vl:  # padding rows of the vocabulary: out of the softmax
        col = torch.arange(vl, device=x.device)
        x = x.masked_fill(col >= valid, float("-inf"))
    # TE indexes targets by the global id and owns [rank*Vl, (rank+1)*Vl); ids beyond V are ignored.
    loss = parallel_cross_entropy(x[None], targets[None], 0.0, False, group)
    return -loss[0]


def vocab_parallel_logprobs(
    logits,
    targets,
    *,
    rows=None,
    temperature=1.0,
    vocab_size=None,
    tp_group=None,
    chunk_size=None,
    with_entropy=False,
    inplace_backward=False,
    backend="chunked",
):
    """fp32 logprobs of ``targets`` under ``log_softmax(logits / temperature)`` over the full vocab.

    ``logits``: ``[N, V/TP]`` (any float dtype), this rank's contiguous vocabulary shard (rank ``r``
    holds ids ``[r*V/TP, (r+1)*V/TP)``, Megatron's ``VocabParallelEmbedding`` layout).
    ``targets``: ``[N]`` global ids, or ``[M]`` when ``rows`` ``[M]`` (unique row indices) selects
    the rows to compute; other rows get zero gradient and cost nothing.
    ``vocab_size``: true vocabulary (ids >= it are padding rows, excluded); ``None`` = no padding.
    ``tp_group``: ``None`` = Megatron's TP group when initialised (else a single rank).
    ``chunk_size``: tokens per chunk (``None``: :func:`default_chunk_size`).
    ``inplace_backward=True`` writes the gradient into the logits' storage during backward: only
    when nothing reads the logits after this backward (true for model output logits consumed only
    here; a second backward through them fails loudly on the version counter).
    Returns ``logprobs`` ``[M]`` or ``(logprobs, entropy)``. Targets outside ``[0, vocab_size)``
    give meaningless (finite) values: mask them.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {_BACKENDS}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V/TP], got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    group, tp, tp_rank = _tp_info(tp_group)
    vl = logits.shape[-1]
    vocab_start = tp_rank * vl
    full = vl * tp
    vocab_size = full if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= full:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {full}] (= V/TP x TP)")
    valid = max(0, min(vl, vocab_size - vocab_start))
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    rows = rows.to(device=logits.device, dtype=torch.long)
    targets = targets.to(device=logits.device, dtype=torch.long)
    if targets.shape != rows.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match rows {tuple(rows.shape)}")

    use_te = backend == "te" or (backend == "auto" and not with_entropy and detect().transformer_engine)
    if use_te:
        if with_entropy:
            raise ValueError("backend='te' has no entropy; use backend='chunked'")
        sel = logits if rows.numel() == logits.shape[0] else logits[rows]
        return _te_logprobs(sel, targets, temperature, vocab_start, valid, group)
    chunk = int(chunk_size) if chunk_size else default_chunk_size(valid)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ChunkedLogprobs.apply(
        logits, rows, targets, float(temperature), vocab_start, valid, group, chunk, bool(with_entropy),
        bool(inplace_backward),
    )


def token_logprobs(
    logits,
    input_ids,
    mask=None,
    **kwargs,
):
    """Logprobs of each sequence's own tokens, aligned to token positions.

    ``logits`` ``[B, T, V/TP]`` from a causal LM over ``input_ids`` ``[B, T]``. Returns ``[B, T]``
    fp32 with ``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` for ``t >= 1``; ``out[:, 0]``
    and every position where ``mask`` ``[B, T]`` is 0 are 0 (and never computed). With
    ``with_entropy=True`` returns ``(logprobs, entropy)`` with the same alignment (entropy of the
    distribution that predicted token ``t``). Other keyword arguments: :func:`vocab_parallel_logprobs`.
    """
    b, t, vl = logits.shape
    if input_ids.shape != (b, t):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} must be [B, T] = {(b, t)}")
    want = torch.ones(b, t, dtype=torch.bool, device=logits.device)
    if mask is not None:
        want &= mask.to(device=logits.device) != 0
    want[:, 0] = False  # nothing predicts the first token
    pos = want.reshape(-1).nonzero().squeeze(1)  # flat index of target positions (b*T + t)
    rows = pos - 1  # predicted by the logits one position earlier (same row since t >= 1)
    targets = input_ids.reshape(-1).to(logits.device)[pos]
    # [B*T, V/TP] is a view of the contiguous model output: no copy of the logits.
    out = vocab_parallel_logprobs(logits.reshape(b * t, vl), targets, rows=rows, **kwargs)
    with_entropy = kwargs.get("with_entropy", False)
    lps = out if not with_entropy else out[0]
    lp = torch.zeros(b * t, dtype=torch.float32, device=logits.device).index_put((pos,), lps).view(b, t)
    if not with_entropy:
        return lp
    ent = torch.zeros(b * t, dtype=torch.float32, device=logits.device).index_put((pos,), out[1]).view(b, t)
    return lp, ent


def naive_logprobs(logits, targets, *, temperature=1.0, vocab_size=None, with_entropy=False):
    """The baseline (TRL ``selective_log_softmax`` style): full fp32 log_softmax, then gather.

    Single rank, full vocabulary ``[..., V]``; used as the reference in tests and the benchmark.
    """
    x = logits.float() / temperature
    if vocab_size is not None and vocab_size < x.shape[-1]:
        x = x[..., :vocab_size]
    logp = torch.log_softmax(x, dim=-1)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    if not with_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)

def _pad_rows(t, n, value):
    if n == 0:
        return t
    return torch.cat([t, t.new_full((n, *t.shape[1:]), value)])


def compute_logprobs(
    model_chunks,
    input_ids,
    mask=None,
    *,
    micro_batch_size=None,
    temperature=1.0,
    vocab_size=None,
    with_entropy=False,
    chunk_size=None,
    attention_mask=None,
    backend="chunked",
):
    """Forward-only logprobs of a batch through a TP x PP Megatron GPT model, returned on EVERY rank.

    ``model_chunks``: this rank's model (a module or a one-element list; DDP-wrapped or bare).
    ``input_ids`` ``[B, T]``: each row is ``prompt | completion | right padding`` starting at
    position 0 (positions are ``0..T-1``; the default causal mask means right padding never
    influences real tokens). ``mask`` ``[B, T]``: positions whose logprob is wanted (e.g. the
    completion mask); alignment as in :func:`token_logprobs`. Every rank of a model-parallel group
    must pass the same batch. ``attention_mask``: ``None`` (causal) or Megatron's boolean mask
    (True = masked), with batch dim ``B`` or 1.

    Runs Megatron's pipeline schedule with ``forward_only=True, collect_non_loss_data=True`` in
    micro-batches of ``micro_batch_size`` (the batch is padded with empty rows to a multiple),
    computes logprobs on the last stage per micro-batch (the logits of a micro-batch are dropped
    before the next one), then broadcasts ``[B, T]`` fp32 from the last stage across the PP group.
    Returns ``logprobs`` or ``(logprobs, entropy)``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks per rank) are not supported")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    mbs = int(micro_batch_size or b)
    n_mb = -(-b // mbs)
    pad = n_mb * mbs - b
    dev = next(chunks[0].parameters()).device
    ids = _pad_rows(input_ids.to(dev, torch.long), pad, 0)
    msk = torch.ones(b, t, dtype=torch.bool, device=dev) if mask is None else mask.to(dev) != 0
    msk = _pad_rows(msk, pad, False)
    am = attention_mask
    if am is not None and am.shape[0] == b and b != 1:
        am = _pad_rows(am.to(dev), pad, True)
    positions = torch.arange(t, device=dev)[None].expand(mbs, t)
    batches = []
    for i in range(n_mb):
        sl = slice(i * mbs, (i + 1) * mbs)
        batches.append({
            "input_ids": ids[sl], "mask": msk[sl],
            "attention_mask": am[sl] if am is not None and am.shape[0] != 1 else am,
        })
    lp_kwargs = dict(temperature=temperature, vocab_size=vocab_size, with_entropy=with_entropy,
                     chunk_size=chunk_size, backend=backend)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(input_ids=mb["input_ids"], position_ids=positions, attention_mask=mb["attention_mask"])

        def collect(logits, non_loss_data=True):
            res = token_logprobs(logits, mb["input_ids"], mb["mask"], **lp_kwargs)
            return torch.stack(res) if with_entropy else res[None]

        return out, collect

    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            collected = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=chunks,
                num_microbatches=n_mb, seq_length=t, micro_batch_size=mbs, forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)

    k = 2 if with_entropy else 1
    if ps.is_pipeline_last_stage():
        result = torch.cat(list(collected), dim=1)[:, :b].contiguous()
    else:
        result = torch.empty(k, b, t, dtype=torch.float32, device=dev)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return (result[0], result[1]) if with_entropy else result[0]
