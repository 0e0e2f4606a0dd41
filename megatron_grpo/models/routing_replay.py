"""R2 routing replay: the experts each token chose in the old-logprob pass, forced in later passes.

Why: after an optimizer step (a second mini-batch, a second PPO epoch) the router may pick other
experts for the same token, so the importance ratio mixes a policy change with a routing change
(the MoE trainer/rollout mismatch users report). R2 records, in the old-logprob pass, the top-k
experts of every token in every MoE layer of this rank's pipeline stage, and the reference and
training passes replay them through megatron-core's own ``RouterReplay`` (``router.router_replay``,
``transformer/moe/router_replay.py``, megatron-core >= 0.16; feature-detected).

What replay changes and what it does not (read from megatron-core 0.16.1 and 0.19.2):

* ``REPLAY_FORWARD`` takes the recorded indices instead of ``topk`` and gathers the CURRENT scores at
  them, so the gating weights (and the router's gradient) follow the current router on the replayed
  experts;
* the load-balancing aux loss (and the z-loss) are computed by ``compute_routing_scores_for_aux_loss``
  from the router's logits with its own top-k, independent of the replay: the aux loss keeps training
  the router's own choice;
* the fused (TE) top-k path ignores the replay: :func:`enable` refuses ``moe_router_fusion``.

Records are keyed per sequence: one ``[B, T, L, k]`` int16 tensor per batch (row, token position,
MoE layer of this stage, expert), so fixed and token-budget micro-batches may regroup, reorder and cut
rows between passes. Token order inside megatron's router is ``[s, b]`` flattened; with sequence
parallelism each TP rank routes its chunk of the sequence, and records are all-gathered over TP.
Positions no record covers (padding) replay experts ``0..k-1``: they never influence real tokens
(causal attention, no token dropping).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

__all__ = ["ROUTING_REPLAY_MODES", "routers", "observing", "enable", "RoutingRecord", "recording", "replaying",
           "changed_choices", "aux_loss_metrics", "release",
           "RoutingPass", "from_rollout", "own_choices"]

ROUTING_REPLAY_MODES = ("none", "r2", "r3")


def _unwrap(m):
    while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
        m = m.module
    return m


def routers(chunks) -> list:
    """This rank's MoE routers (modules with a ``router_replay`` slot), in layer order."""
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    return [m for c in chunks for m in _unwrap(c).modules() if hasattr(m, "router_replay") and hasattr(m, "topk")]


def enable(chunks) -> list:
    """Give every router of ``chunks`` a megatron-core ``RouterReplay`` (what
    ``moe_enable_routing_replay=True`` does at construction); returns the instances in layer order."""
    try:
        from megatron.core.transformer.moe.router_replay import RouterReplay
    except ImportError as e:  # megatron-core < 0.16
        raise ValueError("algorithm.routing_replay=r2 needs megatron-core >= 0.16 (RouterReplay)") from e
    out = []
    for r in routers(chunks):
        if getattr(r.config, "moe_router_fusion", False):
            raise ValueError("algorithm.routing_replay=r2: the fused (TE) router top-k ignores the replay; "
                             "set moe_router_fusion=False")
        if r.router_replay is None:
            r.router_replay = RouterReplay()
        out.append(r.router_replay)
    return out


@contextlib.contextmanager
def recording(replays, b: int, s: int, *, sequence_parallel: bool = False):
    """RECORD during the block; then ``holder[0]`` = ``[b, s, L, k]`` int16 of this micro-batch."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    holder = [None]
    for r in replays:
        r.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield holder
        per_layer = []
        for r in replays:
            idx = r.get_recorded_indices()  # [s_local * b, k], token order [s, b]
            per_layer.append(idx.reshape(-1, b, idx.shape[-1]).transpose(0, 1))  # [b, s_local, k]
        if per_layer:
            rec = torch.stack(per_layer, dim=2).to(torch.int16)  # [b, s_local, L, k]
            if sequence_parallel and rec.shape[1] != s:
                from megatron.core import parallel_state as ps

                parts = [torch.empty_like(rec) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(parts, rec.contiguous(), group=ps.get_tensor_model_parallel_group())
                rec = torch.cat(parts, dim=1)
            holder[0] = rec.cpu()
        else:
            holder[0] = torch.zeros(b, s, 0, 1, dtype=torch.int16)
    finally:
        for r in replays:
            r.clear_router_replay_action()
            r.clear_indices()


def _fill_padding(target: torch.Tensor) -> torch.Tensor:
    """Positions without a record (all zeros: duplicate experts) get experts 0..k-1."""
    k = target.shape[-1]
    if k == 1:
        return target
    dup = (target == target[..., :1]).sum(-1, keepdim=True) > 1
    return torch.where(dup, torch.arange(k, dtype=target.dtype, device=target.device), target)


@contextlib.contextmanager
def replaying(replays, target: torch.Tensor | None, *, sequence_parallel: bool = False):
    """REPLAY_FORWARD of ``target`` ``[b, s, L, k]`` during the block (nothing when ``target`` is None).

    Activation recompute re-runs the router in backward with the target set at that time: exact with
    one pipeline stage (each micro-batch's backward follows its forward); validation refuses full
    recompute with PP > 1."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    if target is None or not replays:
        yield
        return
    if target.shape[2] != len(replays):
        raise ValueError(f"routing record has {target.shape[2]} MoE layers, this stage has {len(replays)}")
    t = _fill_padding(target).to(torch.long)
    if sequence_parallel:
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = t.shape[1] // tp
        t = t[:, rank * n:(rank + 1) * n]
    for i, r in enumerate(replays):
        r.clear_indices()
        r.set_target_indices(t[:, :, i].transpose(0, 1).reshape(-1, t.shape[-1]))  # [s_local * b, k]
        r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    yield


def release(replays) -> None:
    """After a pass: no action, no indices held."""
    for r in replays:
        r.clear_router_replay_action()
        r.clear_indices()


class RoutingRecord:
    """The routing of a ``[B, T]`` batch on this rank: ``tensor`` ``[B, T, L, k]`` int16 (None until
    recorded). ``store``/``target`` address micro-batches by their rows (indices >= B are padding)."""

    def __init__(self, batch_size: int, seq_length: int, tensor: torch.Tensor | None = None):
        self.batch_size, self.seq_length, self.tensor = batch_size, seq_length, tensor

    def store(self, rows, rec: torch.Tensor) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        keep = rows < self.batch_size
        if self.tensor is None:
            self.tensor = torch.zeros(self.batch_size, self.seq_length, *rec.shape[2:], dtype=torch.int16)
        t = min(rec.shape[1], self.seq_length)
        self.tensor[rows[keep], :t] = rec[keep.to(rec.device), :t].to(torch.int16)

    def target(self, rows, t: int) -> torch.Tensor | None:
        if self.tensor is None:
            return None
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = torch.zeros(len(rows), t, *self.tensor.shape[2:], dtype=torch.int16)
        keep = rows < self.batch_size
        w = min(t, self.seq_length)
        out[keep, :w] = self.tensor[rows[keep], :w]
        return out


@contextlib.contextmanager
def observing(router_modules):
    """During the block, each router's routing map ``[tokens, E]`` (bool) as used by its layer (a forward
    hook: independent of how the routing was chosen, replayed or not)."""
    maps = [None] * len(router_modules)

    def hook(i):
        def f(_mod, _inp, out):
            maps[i] = out[1].detach()
        return f

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(router_modules)]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def changed_choices(maps, target: torch.Tensor, lengths, *, sequence_parallel: bool = False) -> tuple[int, int]:
    """(changed, total): (token, layer) pairs among each row's first ``lengths[b]`` positions whose used
    expert SET (``maps`` from :func:`observing`) differs from the record ``target`` ``[b, s, L, k]``."""
    if not maps or any(m is None for m in maps):
        return 0, 0
    b, s = target.shape[:2]
    lo = 0
    if sequence_parallel:
        from megatron.core import parallel_state as ps

        n = s // ps.get_tensor_model_parallel_world_size()
        lo = ps.get_tensor_model_parallel_rank() * n
        target = target[:, lo:lo + n]
    used = torch.stack([m.reshape(-1, b, m.shape[-1]).transpose(0, 1) for m in maps], dim=2)  # [b, s, L, E]
    target = target.to(device=used.device, dtype=torch.long)
    rec = torch.zeros_like(used).scatter_(-1, target, True)
    pos = lo + torch.arange(used.shape[1], device=used.device)
    valid = (pos[None, :] < torch.as_tensor(lengths, device=used.device)[:, None])[..., None]
    if target.shape[-1] > 1:  # positions without a record (duplicate experts: e.g. R3's last token) do not count
        valid = valid & (target != target[..., :1]).any(-1)
    else:
        valid = valid.expand(*used.shape[:3])
    diff = (used != rec).any(-1) & valid
    return int(diff.sum()), int(valid.sum())


def aux_loss_metrics(num_microbatches: int, device) -> dict:
    """``moe/<loss>``: megatron's per-layer aux/z-loss tracker, averaged over micro-batches, MoE layers
    and DP (summed over pipeline stages), then cleared. {} when nothing was tracked."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    out = {}
    for name in sorted(tracker):
        vals = tracker[name]["values"].detach().float()
        t = torch.stack([vals.sum() / max(num_microbatches, 1), (vals != 0).sum().float()]).to(device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        if t[1] > 0:
            out[f"moe/{name}"] = float(t[0] / t[1])
    moe_utils.clear_aux_losses_tracker()
    return out


class RoutingPass:
    """One forward pass's routing: ``"record"`` into ``record`` or ``"replay"`` from it, micro-batch by
    micro-batch (``compute_logprobs(routing=...)``); released at the end of the pass."""

    def __init__(self, chunks, mode: str, record: RoutingRecord):
        from megatron.core.utils import get_model_config

        if mode not in ("record", "replay"):
            raise ValueError(f"routing pass mode {mode!r}: 'record' or 'replay'")
        chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
        self.mode, self.record, self.replays = mode, record, enable(chunks)
        self.sp = bool(getattr(get_model_config(chunks[0]), "sequence_parallel", False))

    @contextlib.contextmanager
    def micro_batch(self, rows, b: int, t: int):
        if self.mode == "record":
            with recording(self.replays, b, t, sequence_parallel=self.sp) as holder:
                yield
            self.record.store(rows, holder[0])
        else:
            with replaying(self.replays, self.record.target(rows, t), sequence_parallel=self.sp):
                yield

    def release(self) -> None:
        release(self.replays)


def from_rollout(chunks, experts, seq_length: int) -> RoutingRecord:
    """R3: the record of the rollout engine's experts (``RolloutBatch.routed_experts`` of these rows,
    ``[len, HF layers, k]``) for this rank's MoE layers (``router.layer_number``: global, 1-based).
    Positions the engine never routed (the last sampled token, padding) stay unrecorded."""
    layers = [int(r.layer_number) - 1 for r in routers(chunks)]
    k = int(routers(chunks)[0].topk) if layers else 1
    t = torch.zeros(len(experts), seq_length, len(layers), k, dtype=torch.int16)
    for i, e in enumerate(experts):
        n = min(int(e.shape[0]), seq_length)
        t[i, :n] = e[:n][:, layers].to(torch.int16)
    return RoutingRecord(len(experts), seq_length, t)


@contextlib.contextmanager
def own_choices(router_modules):
    """During the block, each router's OWN top-k ``[tokens, k]`` (of its logits; replayed or not): the
    choice of megatron's softmax/sigmoid top-k without expert bias or group limit (``models/moe.py``)."""
    out = [None] * len(router_modules)
    saved = []
    for i, r in enumerate(router_modules):
        orig = r.routing

        def routing(logits, *a, _i=i, _orig=orig, _k=int(r.topk), **kw):
            out[_i] = logits.detach().reshape(-1, logits.shape[-1]).topk(_k, dim=-1).indices  # [s * b, k]
            return _orig(logits, *a, **kw)

        r.routing = routing
        saved.append(r)
    try:
        yield out
    finally:
        for r in saved:
            del r.routing  # the class method again


def choice_maps(choices, num_experts: int) -> list:
    """``[tokens, k]`` expert indices -> ``[tokens, E]`` bool maps (the form :func:`changed_choices` reads)."""
    return [None if c is None else torch.zeros(c.shape[0], num_experts, dtype=torch.bool, device=c.device)
            .scatter_(-1, c, True) for c in choices]
