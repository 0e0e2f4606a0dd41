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

Rollout servers on their own nodes (``server`` / ``remote``) reuse the pieces: ``start_engine``,
``FsWeightWriter`` and the ``DriverOwnedEngine`` base (results and errors broadcast from the driver).
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

from megatron_grpo.distributed.ports import free_port
from megatron_grpo.platform import detect
from megatron_grpo.rollout.config import EngineConfig, engine_kwargs
from megatron_grpo.rollout.engine import VLLMRunner, preserve_rng
from megatron_grpo.rollout.packing import pack_bucket
from megatron_grpo.rollout.transfer_group import TransferGroup
from megatron_grpo.rollout.types import RolloutBatch, SamplingConfig

log = logging.getLogger(__name__)

# env of torchrun that must not leak into the engine's own processes (they form their own world)
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _engine_process_env(devices: Sequence[int] | None, cpu: bool, ipc_dir: str | None):
    saved = {k: os.environ.get(k) for k in (*_TORCHRUN_ENV, "CUDA_VISIBLE_DEVICES", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                            "VLLM_CPU_OMP_THREADS_BIND", "VLLM_RPC_BASE_PATH")}
    try:
        for k in _TORCHRUN_ENV:
            os.environ.pop(k, None)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        if ipc_dir:
            os.environ["VLLM_RPC_BASE_PATH"] = ipc_dir  # vLLM's ZMQ ipc:// socket files (see private_ipc_dir)
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


def private_ipc_dir() -> str | None:
    """A new folder for one engine's ZMQ ``ipc://`` socket files, under the folder vLLM would use.
    vLLM names them ``<VLLM_RPC_BASE_PATH>/<uuid>``; a process that is killed, or that ends without the
    interpreter's teardown, never unlinks them, so each engine gets its own folder, which
    :func:`stop_engine` or, when the owner is killed, the engine's guard removes. None (vLLM's own
    folder) where the socket paths would pass the 107-byte limit of a Unix socket's name."""
    import tempfile

    base = os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir()
    if len(os.path.join(base, "mgrpo-ipc-12345678", "0" * 36)) > 100:
        return None
    return tempfile.mkdtemp(prefix="mgrpo-ipc-", dir=base)


def transfer_backend(platform) -> str:
    """The weight-transfer group's backend: NCCL between GPUs, gloo on CPU machines."""
    return "nccl" if platform.cuda else "gloo"


def start_engine(cfg: EngineConfig, *, platform, devices: Sequence[int] | None) -> VLLMRunner:
    """A ``vllm.LLM`` whose engine core and workers run in their own processes (own torch world;
    on CUDA the GPUs ``devices``), with the trainer's RNG streams untouched. The processes start with
    SIGTERM/SIGUSR1 blocked: Slurm signals every process of a step, and they must outlive the signal
    until the trainer has checkpointed (or the rollout server has been shut down)."""
    from vllm import LLM

    from megatron_grpo.trainer.checkpoint import PreemptionFlag

    backend = "mp" if cfg.tensor_parallel_size > 1 else None
    kwargs = engine_kwargs(cfg, platform=platform, executor_backend=backend)
    runner, ipc_dir = None, private_ipc_dir()
    try:
        with PreemptionFlag.children_immune(), preserve_rng(), \
                _engine_process_env(devices, cpu=not platform.cuda, ipc_dir=ipc_dir):
            runner = VLLMRunner(LLM(**kwargs), cfg)
        runner.ipc_dir = ipc_dir
        runner.guard = _start_guard(runner)
        if not platform.cuda and cfg.tensor_parallel_size > 1:
            runner.rpc("mgrpo_unlink_cpu_shm")  # see worker_ext.unlink_vllm_cpu_shm
    except BaseException:  # e.g. a SIGTERM handler's exception: no half-started engine is left running
        if runner is not None:
            stop_engine(runner)
        if ipc_dir:
            shutil.rmtree(ipc_dir, ignore_errors=True)
        raise
    return runner


def _start_guard(runner: VLLMRunner):
    """The engine's processes must not outlive this process, nor leave their /dev/shm files behind
    when they are SIGKILLed together with it (see ``engine_guard``)."""
    from megatron_grpo.rollout.engine_guard import engine_processes, start_guard

    return start_guard(lambda: engine_processes(runner.rpc("mgrpo_pid")), "the vLLM engine's processes",
                       dirs=[runner.ipc_dir] if runner.ipc_dir else [])


def stop_engine(runner: VLLMRunner) -> None:
    """Shut down an engine from :func:`start_engine` (vLLM's own teardown: the engine core and its
    workers end and remove their shared memory), then let its guard check that nothing is left."""
    with contextlib.suppress(Exception):
        runner.rpc("mgrpo_close_transfer_group")
    with contextlib.suppress(Exception):
        runner.llm.llm_engine.engine_core.shutdown()
    guard = getattr(runner, "guard", None)
    if guard is not None:
        guard.release()  # it removes the socket folder once the engine's processes are gone
    elif getattr(runner, "ipc_dir", None):
        shutil.rmtree(runner.ipc_dir, ignore_errors=True)


def while_running(rpc, collective):
    """Run a worker RPC in a thread while this process does its side of a collective with those
    workers (both block until the other side arrives); returns the collective's result."""
    errors = []

    def call():
        try:
            rpc()
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    result = collective()
    t.join()
    if errors:
        raise errors[0]
    return result


class FsWeightWriter:
    """The shared-filesystem transport: one folder ``weights_path/v<version>/`` of safetensors shards
    per update, read by vLLM's ``reload_weights``; older versions are pruned."""

    def __init__(self, root: Path, keep_versions: int = 1):
        self.root, self.keep_versions = Path(root), keep_versions
        self.folder: Path | None = None
        self._shards = 0

    def begin(self, version: int) -> None:
        self.folder = self.root / f"v{version}"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._shards = 0

    def write(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        # clone: q/k/v (and gate/up) are views of one fused tensor; safetensors refuses shared storage
        save_file({n: t.detach().to("cpu").contiguous().clone() for n, t in weights},
                  str(self.folder / f"model-{self._shards:05d}.safetensors"))
        self._shards += 1

    def prune(self) -> None:
        dirs = sorted((p for p in self.root.glob("v*") if p.is_dir() and p.name[1:].isdigit()),
                      key=lambda p: int(p.name[1:]))
        for old in dirs[:-self.keep_versions] if self.keep_versions > 0 else dirs:
            if old != self.folder:
                shutil.rmtree(old, ignore_errors=True)


def _portable(e: Exception) -> Exception:
    """The exception itself if it survives pickling, else a RuntimeError with its one-line text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


class DriverOwnedEngine:
    """What engines owned by one trainer rank (the driver) share: every trainer rank calls the same
    methods; the driver does the work and broadcasts the result, or its error, to the others."""

    placement = "disaggregated"
    driver_rank = 0
    is_driver = True
    _dist = False

    def _from_driver(self, fn):
        import torch.distributed as dist

        out, error = [None], None
        if self.is_driver:
            try:
                out = [("ok", fn())]
            except Exception as e:  # every rank raises it: no rank is left waiting in a collective
                error, out = e, [("error", _portable(e))]
        if self._dist:
            dist.broadcast_object_list(out, src=self.driver_rank)
        status, value = out[0]
        if error is not None:
            raise error
        if status == "error":
            raise value
        return value

    def sleep(self) -> None:  # the engine has its own devices: nothing to free for the trainer
        pass

    def wake_up(self, tags=None) -> None:
        pass


class DisaggregatedEngine(DriverOwnedEngine):

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
        self._fs = FsWeightWriter(self.weights_path, keep_versions) if transport == "fs" else None
        if self.is_driver:
            self.runner = start_engine(cfg, platform=self.platform, devices=devices)
            self.llm = self.runner.llm
            if transport == "pg":
                self._connect(host or os.environ.get("MASTER_ADDR", "127.0.0.1"))
        if self._dist:
            dist.barrier()

    # -- transport setup -------------------------------------------------------------------------
    def _connect(self, host: str) -> None:
        backend = transfer_backend(self.platform)
        port, world = free_port(host), 1 + self.cfg.tensor_parallel_size
        self._group = while_running(
            lambda: self.runner.rpc("mgrpo_init_transfer_group", host, port, world, 1, backend),
            lambda: TransferGroup.connect(host, port, rank=0, world_size=world, backend=backend))

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompts: Sequence, sampling: SamplingConfig, seed: int) -> RolloutBatch:
        """Full batch on every trainer rank (G contiguous completions per prompt, prompt order)."""
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        return self._from_driver(lambda: self.runner.generate(prompts, list(range(len(prompts))), sampling, seed,
                                                              self.weight_version))

    def generate_in_background(self, prompts: Sequence, sampling: SamplingConfig, seed: int):
        """Start :meth:`generate` on a thread of the driver (the engine works in its own processes; the
        driver only waits on the RPC) and return a ``join()`` that every rank calls: it waits for the
        thread on the driver and broadcasts the batch (or its error) as :meth:`generate` does. No other
        engine call (weight update, generate) may run before ``join()`` returns."""
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        box, version = {}, self.weight_version
        thread = None
        if self.is_driver:
            def work():
                try:
                    box["batch"] = self.runner.generate(prompts, list(range(len(prompts))), sampling, seed, version)
                except Exception as e:  # re-raised by join() on every rank
                    box["error"] = e

            thread = threading.Thread(target=work, name="mgrpo-generate", daemon=True)
            thread.start()

        def join() -> RolloutBatch:
            def result():
                thread.join()
                if "error" in box:
                    raise box["error"]
                return box["batch"]

            return self._from_driver(result)

        return join

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
            self._fs.begin(self.weight_version + 1)

    def load_bucket(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.is_driver:
            raise RuntimeError("load_bucket on a non-driver rank of a disaggregated engine")
        if self.transport == "fs":
            self._fs.write(weights)
            return
        buf, meta = pack_bucket(list(weights))
        while_running(lambda: self.runner.rpc("mgrpo_recv_bucket", meta.to_wire()),
                      lambda: self._group.broadcast(buf, src=0))

    def end_weight_update(self, version: int | None = None) -> int:
        new_version = self.weight_version + 1 if version is None else int(version)
        if self.is_driver:
            if self.transport == "pg":
                missing = self.runner.rpc("mgrpo_end_update")
                self.last_not_loaded = sorted({n for per in missing for n in per})
            else:
                self.runner.rpc("mgrpo_reload_from_path", str(self._fs.folder))
                self._fs.prune()
            self.llm.reset_prefix_cache()
            if self.last_not_loaded:
                log.warning("weight update left vLLM parameters untouched: %s", self.last_not_loaded)
        self.weight_version = new_version
        return new_version

    def checksum(self) -> float:
        return self._from_driver(lambda: float(self.runner.rpc("mgrpo_param_checksum")[0]))

    def worker_pids(self) -> list[int]:
        return self._from_driver(lambda: [int(p) for p in self.runner.rpc("mgrpo_pid")])

    def shutdown(self) -> None:
        if self.runner is not None:
            stop_engine(self.runner)  # the workers leave the transfer group first
        if self._group is not None:
            self._group.close()
        self.runner = self.llm = self._group = None
