"""The vLLM rollout engine on its own processes (and, on GPU machines, its own devices).

Placement: the trainer's driver rank (default 0) owns a ``vllm.LLM`` whose engine core and workers
run in separate processes (``VLLM_ENABLE_V1_MULTIPROCESSING=1``; ``mp`` executor for vLLM TP > 1),
each with its own torch.distributed world, so the trainer's world and Megatron's groups are never
touched. On CUDA, ``devices`` selects the GPUs the engine processes see. Every trainer rank calls
:meth:`generate` with the same prompts; the driver generates and broadcasts the full batch.

Weight transports (tensors cannot travel through ``collective_rpc`` to another process):

* ``"pg"``: a private process group (``TransferGroup``: gloo on CPU, NCCL on CUDA) between the driver
  (rank 0) and the engine's workers. Per bucket, the RPC carries only metadata; the driver packs
  the bucket into one flat buffer and broadcasts it; the workers unpack views and load them inside
  a layerwise weight-update session (``worker_ext``).
* ``"fs"``: a shared-filesystem fallback: buckets are written as safetensors shards under
  ``weights_path/v<version>/`` and vLLM's ``reload_weights(weights_path=...)`` reads them.
  Works when the engine runs anywhere that sees the folder; costs a disk round trip.

The bridge (``WeightBridge``) brings every bucket to the driver rank; other trainer ranks only
take part in the gathers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_grpo.platform import detect
from megatron_grpo.rollout.config import EngineConfig, engine_kwargs
from megatron_grpo.rollout.engine import VLLMRunner, preserve_rng
from megatron_grpo.rollout.packing import pack_bucket
from megatron_grpo.rollout.transfer_group import TransferGroup, free_port
from megatron_grpo.rollout.types import RolloutBatch, SamplingConfig

log = logging.getLogger(__name__)

# env of torchrun that must not leak into the engine's own processes (they form their own world)
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _engine_process_env(devices: Sequence[int] | None, cpu: bool):
    saved = {k: os.environ.get(k) for k in (*_TORCHRUN_ENV, "CUDA_VISIBLE_DEVICES", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                            "VLLM_CPU_OMP_THREADS_BIND")}
    try:
        for k in _TORCHRUN_ENV:
            os.environ.pop(k, None)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        if cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu's mp executor binds each worker to its own NUMA node by default and refuses
            # TP > #NUMA nodes (one on most machines); without binding the OS schedules the threads.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class DisaggregatedEngine:
    placement = "disaggregated"

    def __init__(self, cfg: EngineConfig, *, transport: str = "pg", weights_path: str | None = None,
                 driver_rank: int = 0, devices: Sequence[int] | None = None, host: str | None = None,
                 keep_versions: int = 1):
        import torch.distributed as dist

        if transport not in ("pg", "fs"):
            raise ValueError(f"transport must be 'pg' or 'fs', got {transport!r}")
        if transport == "fs" and not weights_path:
            raise ValueError("transport='fs' needs weights_path (a folder the engine can read)")
        self.cfg, self.transport, self.driver_rank = cfg, transport, int(driver_rank)
        self.platform = detect()
        self.weights_path = Path(weights_path) if weights_path else None
        self.keep_versions = keep_versions
        self.weight_version = 0
        self.last_not_loaded: list[str] = []
        self._dist = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_driver = self.rank == self.driver_rank
        self.runner = self.llm = self._group = None
        self._fs_dir: Path | None = None
        self._fs_shards = 0
        if self.is_driver:
            from vllm import LLM

            backend = "mp" if cfg.tensor_parallel_size > 1 else None
            kwargs = engine_kwargs(cfg, platform=self.platform, executor_backend=backend)
            with preserve_rng(), _engine_process_env(devices, cpu=not self.platform.cuda):
                self.runner = VLLMRunner(LLM(**kwargs), cfg)
            self.llm = self.runner.llm
            if not self.platform.cuda and cfg.tensor_parallel_size > 1:
                self.runner.rpc("mgrpo_unlink_cpu_shm")  # see worker_ext.unlink_vllm_cpu_shm
            if transport == "pg":
                self._connect(host or os.environ.get("MASTER_ADDR", "127.0.0.1"))
        if self._dist:
            dist.barrier()

    # -- transport setup -------------------------------------------------------------------------
    def _connect(self, host: str) -> None:
        backend = "nccl" if self.platform.cuda else "gloo"
        port, world = free_port(host), 1 + self.cfg.tensor_parallel_size
        errors = []

        def workers():
            try:
                self.runner.rpc("mgrpo_init_transfer_group", host, port, world, 1, backend)
            except BaseException as e:  # surfaced below
                errors.append(e)

        t = threading.Thread(target=workers, daemon=True)
        t.start()
        self._group = TransferGroup.connect(host, port, rank=0, world_size=world, backend=backend)
        t.join()
        if errors:
            raise errors[0]

    # -- generation --------------------------------------------------------------------------------
    def _from_driver(self, fn):
        import torch.distributed as dist

        out = [fn() if self.is_driver else None]
        if self._dist:
            dist.broadcast_object_list(out, src=self.driver_rank)
        return out[0]

    def generate(self, prompts: Sequence, sampling: SamplingConfig, seed: int) -> RolloutBatch:
        """Full batch on every trainer rank (G contiguous completions per prompt, prompt order)."""
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        return self._from_driver(lambda: self.runner.generate(prompts, list(range(len(prompts))), sampling, seed,
                                                              self.weight_version))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        sequences = [[int(t) for t in s] for s in sequences]
        return self._from_driver(lambda: self.runner.score(sequences))

    # -- weight updates (the bridge calls these on every rank; only the driver acts) ---------------
    def begin_weight_update(self) -> None:
        if not self.is_driver:
            return
        if self.transport == "pg":
            self.runner.rpc("mgrpo_begin_update")
        else:
            self._fs_dir = self.weights_path / f"v{self.weight_version + 1}"
            shutil.rmtree(self._fs_dir, ignore_errors=True)
            self._fs_dir.mkdir(parents=True)
            self._fs_shards = 0

    def load_bucket(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.is_driver:
            raise RuntimeError("load_bucket on a non-driver rank of a disaggregated engine")
        weights = list(weights)
        if self.transport == "fs":
            from safetensors.torch import save_file

            # clone: q/k/v (and gate/up) are views of one fused tensor; safetensors refuses shared storage
            save_file({n: t.detach().to("cpu").contiguous().clone() for n, t in weights},
                      str(self._fs_dir / f"model-{self._fs_shards:05d}.safetensors"))
            self._fs_shards += 1
            return
        buf, meta = pack_bucket(weights)
        errors = []

        def workers():
            try:
                self.runner.rpc("mgrpo_recv_bucket", meta.to_wire())
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=workers, daemon=True)
        t.start()
        self._group.broadcast(buf, src=0)
        t.join()
        if errors:
            raise errors[0]

    def end_weight_update(self, version: int | None = None) -> int:
        new_version = self.weight_version + 1 if version is None else int(version)
        if self.is_driver:
            if self.transport == "pg":
                missing = self.runner.rpc("mgrpo_end_update")
                self.last_not_loaded = sorted({n for per in missing for n in per})
            else:
                self.runner.rpc("mgrpo_reload_from_path", str(self._fs_dir))
                self._prune_versions()
            self.llm.reset_prefix_cache()
            if self.last_not_loaded:
                log.warning("weight update left vLLM parameters untouched: %s", self.last_not_loaded)
        self.weight_version = new_version
        return new_version

    def _prune_versions(self) -> None:
        dirs = sorted((p for p in self.weights_path.glob("v*") if p.is_dir() and p.name[1:].isdigit()),
                      key=lambda p: int(p.name[1:]))
        for old in dirs[:-self.keep_versions] if self.keep_versions > 0 else dirs:
            if old != self._fs_dir:
                shutil.rmtree(old, ignore_errors=True)

    def checksum(self) -> float:
        return self._from_driver(lambda: float(self.runner.rpc("mgrpo_param_checksum")[0]))

    def worker_pids(self) -> list[int]:
        return self._from_driver(lambda: [int(p) for p in self.runner.rpc("mgrpo_pid")])

    def sleep(self) -> None:  # the engine has its own devices: nothing to free for the trainer
        pass

    def wake_up(self, tags=None) -> None:
        pass

    def shutdown(self) -> None:
        if self._group is not None:
            with contextlib.suppress(Exception):
                self.runner.rpc("mgrpo_close_transfer_group")
            self._group.close()
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
        self.runner = self.llm = self._group = None
