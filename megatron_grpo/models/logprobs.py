"""Per-token logprobs (and entropy) from tensor-parallel logits without gathering the vocabulary.

GRPO needs ``log p(token)`` for every completion token, three times per step (policy, old policy,
reference). The textbook way (TRL's ``selective_log_softmax``) materialises fp32 ``[tokens, V]``
log-softmax outputs and keeps them for backward: at V = 152k and 8k tokens that is 5 GB per copy.
Here each TP rank only ever sees its own vocabulary shard ``[.., V/TP]`` and only a chunk of tokens
at a time:

* forward, per chunk of ``c`` tokens: a fused ``log_softmax`` over the local shard gives the
  local log-partition (``max + log sum exp``, read at the arg-max, so no cancellation), the target
  logit (on the rank that owns the id) and, for the entropy, ``sum p log p``; one MAX and one SUM
  all-reduce of ``[c]``-sized vectors combine the ranks. Only ``[c]``-sized statistics are saved;
* backward recomputes ``softmax`` chunk by chunk from the saved (unconverted) logits, scales it to
  the global distribution and writes ``(onehot - p) * grad / T`` straight into the gradient.
  With ``inplace_backward=True`` that gradient reuses the logits' own storage (the training step
  does this: model output logits are dead after this backward).

Extra peak memory is a few ``[c, V/TP]`` fp32 buffers (``c`` defaults to ~32M elements / (V/TP),
128 MiB per buffer), plus the ``[N, V/TP]`` gradient unless it is written in place. Measured in
``bench/logprobs.py``.

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

import contextlib
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


def _chunk_plan(rows_cpu, m_rows, chunk):
    """[(s, e, slice or None)]: output positions s..e and, when their logits rows are contiguous,
    the slice of rows (a view, no copy); otherwise None (the rows are gathered, a chunk-sized copy)."""
    plan = []
    for s in range(0, m_rows, chunk):
        e = min(s + chunk, m_rows)
        if rows_cpu is None:
            plan.append((s, e, slice(s, e)))
            continue
        a, b = int(rows_cpu[s]), int(rows_cpu[e - 1])
        plan.append((s, e, slice(a, b + 1) if b - a + 1 == e - s else None))
    return plan


def _chunk_input(logits, rows, s, e, sl, valid, temperature):
    """fp32 ``logits / T`` of one chunk over the valid (non-padding) columns. Read-only: it may be a
    view of the logits (fp32, T = 1, contiguous rows); conversions and divisions make copies."""
    x = logits[sl, :valid] if sl is not None else logits.index_select(0, rows[s:e])[:, :valid]
    if x.dtype != torch.float32:
        x = x.float()
        return x.div_(temperature) if temperature != 1.0 else x
    return x / temperature if temperature != 1.0 else x  # division, like vLLM (not * 1/T)


class _ChunkedLogprobs(torch.autograd.Function):
    """logits [N, Vl] (local shard) -> logprobs [M] (+ entropy [M]) of rows ``rows`` [M] (None = all)."""

    @staticmethod
    def forward(ctx, logits, rows, targets, temperature, vocab_start, valid, group, chunk, with_entropy, inplace):
        ctx.set_materialize_grads(False)  # an unused output (e.g. entropy as a metric) costs nothing
        m_rows = targets.numel()
        rows_cpu = None if rows is None else rows.cpu()
        plan = _chunk_plan(rows_cpu, m_rows, chunk)
        f32 = dict(dtype=torch.float32, device=logits.device)
        lp = torch.empty(m_rows, **f32)
        need_lse = group is not None or with_entropy
        lse_l_all = torch.empty(m_rows, **f32) if group is not None else None  # this rank's log-partition
        lse_all = torch.empty(m_rows, **f32) if need_lse else None  # global log-partition
        ent_all = torch.empty(m_rows, **f32) if with_entropy else None
        for s, e, sl in plan:
            t = targets[s:e] - vocab_start
            own = (t >= 0) & (t < valid)
            tc = t.clamp(0, max(valid - 1, 0))[:, None]
            if valid == 0:  # this rank holds only padding rows of the vocabulary
                z = torch.zeros(e - s, **f32)
                lse_l, lp_l, tgt, neg_h = torch.full_like(z, float("-inf")), z, z, (z if with_entropy else None)
            else:
                x = _chunk_input(logits, rows, s, e, sl, valid, temperature)
                ls = torch.log_softmax(x, dim=-1)  # fused; the only [c, V/TP] buffer of the forward
                lp_l = ls.gather(1, tc).squeeze(1)
                lse_l = neg_h = None
                if need_lse:
                    mx, arg = x.max(dim=-1)
                    lse_l = mx - ls.gather(1, arg[:, None]).squeeze(1)  # max + log(sum exp(x - max))
                if with_entropy:
                    neg_h = torch.exp(ls).mul_(ls).sum(-1)  # sum p log p over this rank's columns
                tgt = torch.where(own, x.gather(1, tc).squeeze(1), torch.zeros_like(lp_l))
                del x, ls
            if group is None:
                lp[s:e] = lp_l
                if need_lse:
                    lse_all[s:e] = lse_l
                if with_entropy:
                    ent_all[s:e] = -neg_h
            else:
                lse_g, tgt_g, ent = _combine_across_tp(lse_l, tgt, neg_h, valid, group)
                lp[s:e] = tgt_g - lse_g
                lse_l_all[s:e], lse_all[s:e] = lse_l, lse_g
                if with_entropy:
                    ent_all[s:e] = ent
        ctx.save_for_backward(logits, rows, targets, lse_l_all, lse_all, ent_all)
        ctx.cfg = (temperature, vocab_start, valid, inplace, plan)
        if with_entropy:
            return lp, ent_all.clone()
        return lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_ent=None):
        logits, rows, targets, lse_l_all, lse_all, ent_all = ctx.saved_tensors
        temperature, vocab_start, valid, inplace, plan = ctx.cfg
        n, vl = logits.shape
        if grad_lp is None and grad_ent is None:
            return (torch.zeros_like(logits),) + (None,) * 9
        if inplace:
            # The logits are dead after this backward (documented contract): reuse their storage.
            out = logits.detach()
            if rows is not None and rows.numel() < n:
                untouched = torch.ones(n, dtype=torch.bool, device=out.device)
                untouched[rows] = False
                out[untouched] = 0
        else:
            out = torch.zeros_like(logits)
        f32 = dict(dtype=torch.float32, device=logits.device)
        for s, e, sl in plan:
            out_rows = out[sl] if sl is not None else None
            if valid == 0:  # pad-only shard: zero gradient (also over reused in-place storage)
                if out_rows is not None:
                    out_rows.zero_()
                else:
                    out.index_fill_(0, rows[s:e], 0)
                continue
            g = grad_lp[s:e].float() if grad_lp is not None else torch.zeros(e - s, **f32)
            t = targets[s:e] - vocab_start
            own = (t >= 0) & (t < valid)
            tc = t.clamp(0, valid - 1)[:, None]
            x = _chunk_input(logits, rows, s, e, sl, valid, temperature)
            # p_global = softmax_local(x) * exp(lse_local - lse_global): the scale goes into a per-row coef
            p = torch.softmax(x, dim=-1)
            coef = -g / temperature
            if grad_ent is not None:
                # d(lp)/dx = onehot - p ;  d(H)/dx = -p * (x - E_p[x]) = -p * (y + H), y = log p
                y = torch.sub(x, lse_all[s:e, None])
                y.add_(ent_all[s:e, None]).mul_(grad_ent[s:e, None].float()).add_(g[:, None])
                p.mul_(y)
                del y
                coef = torch.full_like(g, -1.0 / temperature)
            del x
            if lse_l_all is not None:
                coef = coef * torch.exp(lse_l_all[s:e] - lse_all[s:e])
            onehot = torch.where(own, g / temperature, torch.zeros_like(g))[:, None]
            if out_rows is not None and out.dtype == torch.float32:
                dst = out_rows[:, :valid]  # may alias x's storage (in-place): x is no longer needed
                torch.mul(p, coef[:, None], out=dst)
                dst.scatter_add_(1, tc, onehot)
            else:
                p.mul_(coef[:, None]).scatter_add_(1, tc, onehot)
                if out_rows is not None:
                    out_rows[:, :valid].copy_(p)
                else:
                    full = p if valid == vl else torch.nn.functional.pad(p, (0, vl - valid))
                    out.index_copy_(0, rows[s:e], full.to(out.dtype))
            if out_rows is not None and valid < vl:
                out_rows[:, valid:] = 0
            del p
        return (out,) + (None,) * 9


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

    x = logits.float()  # TE writes its gradient into its input: never hand it the logits themselves
    x = x / temperature if temperature != 1.0 else (x.clone() if x is logits else x)
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
    if rows is not None:
        rows = rows.to(device=logits.device, dtype=torch.long)
    targets = targets.to(device=logits.device, dtype=torch.long)
    n_out = logits.shape[0] if rows is None else rows.numel()
    if targets.dim() != 1 or targets.numel() != n_out:
        raise ValueError(f"targets {tuple(targets.shape)} must be [{n_out}] (one per selected row)")

    use_te = backend == "te" or (backend == "auto" and not with_entropy and detect().transformer_engine)
    if use_te:
        if with_entropy:
            raise ValueError("backend='te' has no entropy; use backend='chunked'")
        sel = logits if rows is None else logits[rows]
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
    max_tokens=None,
    routing=None,
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
    Returns ``logprobs`` or ``(logprobs, entropy)``. ``max_tokens``: token-budget micro-batches
    instead (``training/token_budget.py``: rows grouped under this many padded tokens, each
    micro-batch cut to its longest row; causal attention only). ``routing``: a
    ``models.routing_replay.RoutingPass`` that records or replays each row's MoE routing (R2).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks per rank) are not supported")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    from megatron_grpo.models.norms import pad_sequence, sequence_multiple

    mult = sequence_multiple(chunks[0])
    if t % mult:  # sequence parallel: pad T to a multiple of TP (masked out), drop the padding from the result
        am = None if attention_mask is None else torch.nn.functional.pad(  # [.., T, T]: padding masked
            attention_mask, (0, -t % mult, 0, -t % mult), value=True)
        res = compute_logprobs(
            chunks, pad_sequence(input_ids, mult, 0), pad_sequence(torch.ones(b, t) if mask is None else mask, mult, 0),
            micro_batch_size=micro_batch_size, temperature=temperature, vocab_size=vocab_size,
            with_entropy=with_entropy, chunk_size=chunk_size, attention_mask=am, backend=backend, routing=routing)
        return tuple(r[:, :t] for r in res) if with_entropy else res[:, :t]
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
            "attention_mask": am[sl] if am is not None and am.shape[0] != 1 else am, "rows": range(sl.start, sl.stop),
        })
    groups = None
    if max_tokens and attention_mask is None:
        from megatron_grpo.training.micro_batching import budget_logprob_batches

        batches, groups = budget_logprob_batches(ids[:b], msk[:b], max_tokens, chunks[0])
        n_mb, mbs = len(batches), max(x["input_ids"].shape[0] for x in batches)
        for x, g in zip(batches, groups):
            x["rows"] = g
    lp_kwargs = dict(temperature=temperature, vocab_size=vocab_size, with_entropy=with_entropy,
                     chunk_size=chunk_size, backend=backend)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        with (routing.micro_batch(list(mb["rows"]), *mb["input_ids"].shape) if routing is not None
              else contextlib.nullcontext()):
            out = model(input_ids=mb["input_ids"], position_ids=mb.get("position_ids", positions),
                        attention_mask=mb["attention_mask"])

        def collect(logits, non_loss_data=True):
            res = token_logprobs(logits, mb["input_ids"], mb["mask"], **lp_kwargs)
            return torch.stack(res) if with_entropy else res[None]

        return out, collect

    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    from megatron.core.utils import get_model_config

    from megatron_grpo.training.micro_batching import assemble_rows, variable_shapes

    try:
        with torch.no_grad(), variable_shapes(get_model_config(chunks[0]), groups is not None):
            collected = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=chunks,
                num_microbatches=n_mb, seq_length=t, micro_batch_size=mbs, forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)
        if routing is not None:
            routing.release()

    k = 2 if with_entropy else 1
    if ps.is_pipeline_last_stage():
        result = assemble_rows(collected, groups, b, t)
    else:
        result = torch.empty(k, b, t, dtype=torch.float32, device=dev)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return (result[0], result[1]) if with_entropy else result[0]
