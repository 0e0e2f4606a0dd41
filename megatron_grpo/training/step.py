"""One GRPO optimizer update on a TP x PP x DP Megatron policy: micro-batches through Megatron's
pipeline schedule, the loss from ``megatron_grpo.algorithms.grpo_loss``, exact normalisation,
clipping, and a skipped update when anything is non-finite.

Exactness (why the gradient does not depend on micro-batch size or DP size):

1. Before any forward, each rank sums ``loss_normalizer(mask, agg_mode)`` over its micro-batches
   and all-reduces (SUM) over the DP group: ``N`` = the normaliser of the WHOLE global batch
   (token count for ``token-mean``, sequence count for the ``seq-mean-*`` modes).
2. Each micro-batch's loss is ``aggregate(per_token, mask, agg_mode, N)`` = its numerator / N, so
   the micro-batch losses of all DP ranks add up to the full-batch loss.
3. The model is wrapped by :func:`training.optimizer.wrap_model_for_training`
   (``calculate_per_token_loss=True``): Megatron's schedule neither divides the loss by the number
   of micro-batches nor by a token count (we return the 3-tuple ``(loss, num_tokens, metrics)``),
   DDP SUMS gradients over DP, and ``finalize_model_grads_summed`` skips the 1/num_tokens rescale.
   Gradients accumulate over micro-batches (a sum), so the final gradient is exactly
   ``d(full-batch loss)/d(theta)``, up to fp32 summation order.

Metrics: each micro-batch's ``grpo_loss`` metrics (``*_sum``, ``*_count``, ``*_min``, ``*_max``)
are combined over micro-batches with ``combine_metrics``, all-reduced over DP per reduce op
(``pack_metrics``), finalised, and broadcast from the last pipeline stage so every rank returns
the same dict.

Non-finite guard: if the global loss, or the gradient norm, is inf/NaN (or fp16 loss scaling found
an overflow), no parameter and no optimizer state changes: gradients are zeroed, the LR schedule
does not advance, and ``skipped_steps`` counts it. All ranks agree (one MAX all-reduce of the flag).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from megatron_grpo.algorithms import (
    combine_metrics,
    finalize_metrics,
    grpo_loss,
    loss_normalizer,
    pack_metrics,
    unpack_metrics,
)
from megatron_grpo.models import routing_replay as RR
from megatron_grpo.models.logprobs import token_logprobs
from megatron_grpo.models.moe_load import expert_load_counts, reduced_load_metrics
from megatron_grpo.models.norms import sequence_multiple

from .batch import GRPOBatch
from .micro_batching import assemble_rows, padding_fraction, split_micro_batches, variable_shapes
from .token_budget import row_lengths
from .optimizer import finalize_model_grads_summed

__all__ = ["GRPOTrainStep"]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
# grpo_loss keywords the step passes through (GRPO math lives in algorithms/)
_LOSS_KEYS = ("agg_mode", "eps_low", "eps_high", "dual_clip", "kl_coef", "kl_kind", "kl_clamp", "is_level",
              "is_cap", "entropy_coef", "policy_loss_kind")


class GRPOTrainStep:
    """Callable ``step(batch) -> metrics`` bound to a policy, its optimizer and LR schedule.

    ``model_chunks``: this rank's DDP-wrapped chunk(s) from ``wrap_model_for_training``.
    ``optimizer``: from ``build_optimizer``; ``scheduler``: from ``build_lr_scheduler`` or None.
    ``micro_batch_size``: rows per micro-batch. ``temperature``: the sampling temperature (logprobs
    are ``log_softmax(logits / T)``, like vLLM's processed logprobs). ``vocab_size``: the true
    vocabulary (HF ``config.vocab_size``); padded rows are excluded from the softmax.
    ``loss``: keyword arguments for ``algorithms.grpo_loss`` (agg_mode, eps_low, eps_high,
    dual_clip, kl_coef, kl_kind, kl_clamp, is_level, is_cap, entropy_coef, policy_loss_kind). ``max_len``: the run's
    max completion length, needed by ``agg_mode="seq-mean-token-sum-norm"``. ``log_entropy``:
    compute the policy entropy as a metric even when ``entropy_coef == 0`` (cheap). ``routing_replay``
    (MoE): ``"r2"``/``"r3"`` force ``batch.routing`` (the old pass's / the rollout engine's experts,
    ``models/routing_replay.py``) in every micro-batch; with any mode ``moe/routing_changed_frac`` compares
    the used routing with it; ``"r3"`` adds ``moe/rollout_routing_diff_frac`` (the router's own choice vs it).
    """

    def __init__(self, model_chunks, optimizer, scheduler=None, *, micro_batch_size: int,
                 temperature: float = 1.0, vocab_size: int | None = None, loss: dict | None = None,
                 max_len: int | None = None, log_entropy: bool = True, chunk_size: int | None = None,
                 logprob_backend: str = "chunked", max_tokens_per_microbatch: int | None = None,
                 routing_replay: str = "none"):
        from megatron.core.utils import get_model_config

        self.model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if len(self.model_chunks) != 1:
            raise NotImplementedError("virtual pipeline stages (several model chunks per rank) are not supported")
        self.config = get_model_config(self.model_chunks[0])
        if not self.config.calculate_per_token_loss or self.config.finalize_model_grads_func is not \
                finalize_model_grads_summed:
            raise ValueError("wrap the model with training.optimizer.wrap_model_for_training: exact loss "
                             "normalisation needs calculate_per_token_loss=True and finalize_model_grads_summed")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.micro_batch_size = int(micro_batch_size)
        self.max_tokens = int(max_tokens_per_microbatch) if max_tokens_per_microbatch else None
        self.last_logprobs = None  # [B, T] of the last call's training forward (last PP stage; else None)
        self.loss_kwargs = dict(loss or {})
        unknown = set(self.loss_kwargs) - set(_LOSS_KEYS)
        if unknown:
            raise ValueError(f"unknown grpo_loss options {sorted(unknown)}; allowed: {_LOSS_KEYS}")
        self.agg_mode = self.loss_kwargs.get("agg_mode", "token-mean")
        self.max_len = max_len
        self.lp_kwargs = dict(temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size,
                              backend=logprob_backend, inplace_backward=True)
        self.with_entropy = bool(log_entropy or self.loss_kwargs.get("entropy_coef", 0.0))
        self.steps = 0  # calls
        # MoE: batch.routing (the old pass's experts) is replayed with "r2" and compared with (metrics) always
        if routing_replay not in RR.ROUTING_REPLAY_MODES:
            raise ValueError(f"routing_replay={routing_replay!r}; expected one of {RR.ROUTING_REPLAY_MODES}")
        self.routing_replay = routing_replay
        self._moe = bool(getattr(self.config, "num_moe_experts", None))
        self._routers = RR.routers(self.model_chunks) if self._moe else []
        self._replays = RR.enable(self.model_chunks) if self._moe and routing_replay in ("r2", "r3") else []
        self._sp = bool(getattr(self.config, "sequence_parallel", False))
        self._routing_counts, self._load_counts = [0, 0, 0, 0], None
        self.skipped_steps = 0  # calls whose update was skipped

    # ------------------------------------------------------------------ helpers
    def _global_normalizer(self, micro_batches, device) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        n = torch.zeros((), dtype=torch.int64, device=device)
        for mb in micro_batches:
            n += loss_normalizer(mb.completion_mask, self.agg_mode, self.max_len).to(device)
        dist.all_reduce(n, op=dist.ReduceOp.SUM, group=ps.get_data_parallel_group())
        return n

    def _forward_step(self, normalizer, captured=None):
        positions_cache = {}

        def forward_step(data_iterator, model):
            mb: GRPOBatch = next(data_iterator)
            b, t = mb.input_ids.shape
            if (b, t) not in positions_cache:
                positions_cache[(b, t)] = torch.arange(t, device=mb.input_ids.device)[None].expand(b, t)
            with self._routing(mb):
                out = model(input_ids=mb.input_ids, position_ids=positions_cache[(b, t)], attention_mask=None)

            def loss_func(logits):
                res = token_logprobs(logits, mb.input_ids, mb.completion_mask, with_entropy=self.with_entropy,
                                     **self.lp_kwargs)
                lp, ent = res if self.with_entropy else (res, None)
                if captured is not None:
                    captured.append(lp.detach().clone())  # the old-policy logprobs when on-policy
                loss, metrics = grpo_loss(
                    lp, mb.old_logprobs, mb.advantages, mb.completion_mask, normalizer=normalizer,
                    ref_logprobs=mb.ref_logprobs, rollout_logprobs=mb.rollout_logprobs, entropy=ent,
                    **self.loss_kwargs,
                )
                num_tokens = (mb.completion_mask != 0).sum().to(torch.int)
                # 3-tuple + calculate_per_token_loss: megatron adds, never divides (module doc)
                return loss, num_tokens, metrics

            return out, loss_func

        return forward_step

    @contextlib.contextmanager
    def _routing(self, mb):
        """R2/R3: force the recorded experts; either way count the (token, layer) expert sets that differ
        and the expert load; R3 also compares the router's own choice with the rollout engine's."""
        if not self._routers:
            yield
            return
        from megatron.core import parallel_state as ps

        r3 = self.routing_replay == "r3" and mb.routing is not None
        with RR.observing(self._routers) as maps, \
                (RR.own_choices(self._routers) if r3 else contextlib.nullcontext()) as own, \
                RR.replaying(self._replays, mb.routing if self.routing_replay in ("r2", "r3") else None,
                             sequence_parallel=self._sp):
            yield
        lengths = row_lengths(mb.completion_mask)
        if all(m is not None for m in maps):  # expert load of the routing used (models/moe_load.py)
            tp = ps.get_tensor_model_parallel_world_size()
            lo = ps.get_tensor_model_parallel_rank() * (mb.input_ids.shape[1] // tp) if self._sp else 0
            keep = None
            if r3 and mb.routing.shape[-1] > 1:  # R3 replays placeholders where vLLM routed nothing (last token)
                keep = (mb.routing != mb.routing[..., :1]).any(-1).all(-1)  # [b, T]
                keep = keep[:, lo:lo + maps[0].shape[0] // mb.input_ids.shape[0]]
            self._load_counts += expert_load_counts(maps, mb.input_ids.shape[0], lengths, lo=lo, keep=keep)
        if mb.routing is None:
            return
        if self._sp or ps.get_tensor_model_parallel_rank() == 0:  # TP peers route the same tokens
            ch, tot = RR.changed_choices(maps, mb.routing, lengths, sequence_parallel=self._sp)
            self._routing_counts[0] += ch
            self._routing_counts[1] += tot
            if r3:  # the router's own choice (no replay) vs the rollout engine's
                ch, tot = RR.changed_choices(RR.choice_maps(own, self.config.num_moe_experts), mb.routing, lengths,
                                             sequence_parallel=self._sp)
                self._routing_counts[2] += ch
                self._routing_counts[3] += tot

    def _moe_metrics(self, batch, n_mb: int, device) -> dict:
        """moe/routing_changed_frac (vs the old pass's record), moe/load_* and megatron's aux/z-loss trackers."""
        RR.release(self._replays)
        if not self._moe:
            return {}
        out = RR.aux_loss_metrics(n_mb, device)
        out.update(reduced_load_metrics(self._load_counts, device, sequence_parallel=self._sp))
        if batch.routing is not None:
            t = torch.tensor(self._routing_counts, dtype=torch.float64, device=device)
            dist.all_reduce(t)
            if t[1] > 0:
                out["moe/routing_changed_frac"] = float(t[0] / t[1])
            if t[3] > 0:  # R3: share of (token, layer) expert sets the trainer's router would pick differently
                out["moe/rollout_routing_diff_frac"] = float(t[2] / t[3])
        self._routing_counts = [0, 0, 0, 0]
        return out

    def _reduce_metrics(self, per_mb: list) -> dict:
        """Combine over micro-batches, reduce over DP, broadcast from the last PP stage."""
        from megatron.core import parallel_state as ps

        result = [None]
        if ps.is_pipeline_last_stage():
            combined = combine_metrics(per_mb)
            packed = pack_metrics(combined)
            for op, (_, tensor) in packed.items():
                dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=ps.get_data_parallel_group())
            result = [finalize_metrics(unpack_metrics(packed))]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(result, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
        return result[0]

    def _zero_grads(self):
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _apply_update(self, loss_value: float) -> tuple[bool, float]:
        """Prepare grads, compute the norm, skip on non-finite, else clip and step."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        found_inf = bool(self.optimizer.prepare_grads())
        grad_norm = float(self.optimizer.get_grad_norm()) if not found_inf else float("nan")
        bad = found_inf or not math.isfinite(loss_value) or not math.isfinite(grad_norm)
        flag = torch.tensor([1.0 if bad else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank takes the same branch
        if flag.item() > 0:
            self._zero_grads()
            return False, grad_norm
        clip = float(self.optimizer.config.clip_grad or 0.0)
        if clip > 0.0:
            subs = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            for sub in subs:
                params = sub.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params, max_norm=clip, total_norm=grad_norm,
                        use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        ok = bool(self.optimizer.step_with_ready_grads())
        if ok and self.scheduler is not None:
            self.scheduler.step(increment=1)
        return ok, grad_norm

    def _device(self) -> torch.device:
        return next(self.model_chunks[0].parameters()).device

    # ------------------------------------------------------------------ the step
    def compute_gradients(self, batch: GRPOBatch) -> dict:
        """Zero grads, run forward+backward over all micro-batches; grads end up summed over DP.

        Returns the reduced loss metrics (same dict on every rank) plus ``normalizer`` and
        ``num_microbatches``. No parameter changes; :meth:`__call__` = this + the guarded update.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = self._device()
        batch = batch.to(device).pad_columns(sequence_multiple(self.config))  # SP: T a multiple of TP
        if batch.batch_size == 0:
            batch = batch.pad_rows(1)  # every rank runs the schedule (and DDP's all-reduce) once
        micro_batches, groups, tokens = split_micro_batches(batch, self.micro_batch_size, self.max_tokens,
                                                            self.config)
        normalizer = self._global_normalizer(micro_batches, device)

        self._zero_grads()
        for chunk in self.model_chunks:
            chunk.train()
        captured, self._routing_counts = [], [0, 0, 0, 0]
        self._load_counts = torch.zeros(len(self._routers), getattr(self.config, "num_moe_experts", None) or 0,
                                        dtype=torch.float64)
        with variable_shapes(self.config, groups is not None):
            per_mb = get_forward_backward_func()(
                forward_step_func=self._forward_step(normalizer, captured), data_iterator=iter(micro_batches),
                model=self.model_chunks, num_microbatches=len(micro_batches), seq_length=batch.seq_length,
                micro_batch_size=max(mb.batch_size for mb in micro_batches), forward_only=False,
            )
        self.last_logprobs = assemble_rows(captured, groups, batch.batch_size, batch.seq_length)
        metrics = self._reduce_metrics(per_mb)
        metrics.update({"num_microbatches": float(len(micro_batches)), "normalizer": float(normalizer),
                        "padding_frac": padding_fraction(tokens, device)})
        metrics.update(self._moe_metrics(batch, len(micro_batches), device))
        return metrics

    def __call__(self, batch: GRPOBatch) -> dict:
        """One optimizer update on this DP rank's shard ``batch`` (TP/PP peers pass the same rows).

        Returns the metrics of :meth:`compute_gradients` plus ``grad_norm`` (before clipping),
        ``lr`` (used by this update), ``skipped`` (1.0 if the update was skipped) and
        ``skipped_steps`` (running total).
        """
        metrics = self.compute_gradients(batch)
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else float("nan")
        ok, grad_norm = self._apply_update(metrics.get("loss", float("nan")))
        self.steps += 1
        if not ok:
            self.skipped_steps += 1
        metrics.update({"grad_norm": grad_norm, "lr": lr, "skipped": 0.0 if ok else 1.0,
                        "skipped_steps": float(self.skipped_steps)})
        return metrics
