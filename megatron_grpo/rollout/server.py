"""A rollout server: what `megatron-grpo train` runs with ``GRPO_ROLE=rollout`` (node-split jobs,
``slurm/grpo_disaggregated.sh``).

Each rank of the rollout world whose rank starts a vLLM TP group (``rank % rollout.tp == 0``) is
one replica: it hosts a ``vllm.LLM`` in its own processes, exactly as the in-job
``DisaggregatedEngine`` does on its driver (``start_engine``; on CUDA the group's GPUs through
``CUDA_VISIBLE_DEVICES``), connects to the trainer's driver at
``GRPO_TRANSFER_ADDR:GRPO_TRANSFER_PORT`` (``rollout/control.py``) and serves its commands until
the trainer says ``shutdown`` or disconnects. The other ranks of a TP group only keep their Slurm
task alive until their leader is done.

Signals: Slurm signals every process of the step, and the trainer, signalled at the same time,
still needs its replicas to finish the current step and checkpoint. So the vLLM processes start
with SIGTERM/SIGUSR1 blocked, SIGUSR1 is only logged, and SIGTERM ends the server at once only
while no trainer is connected; once connected, the server exits (0) when the trainer is done with
it, which after a SIGTERM is at the latest when the trainer's own step ends.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from megatron_grpo.errors import INPUT_ERRORS
from megatron_grpo.rollout import control


def _log(msg: str) -> None:
    print(f"[megatron-grpo rollout {os.environ.get('RANK', '0')}] {msg}", flush=True)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if not value.lstrip("-").isdigit():
        raise ValueError(f"GRPO_ROLE=rollout: {name}={value!r} is not an integer")
    return int(value)


class _Stop(Exception):
    """Raised by the SIGTERM handler while the server is not serving a trainer."""


class _Signals:
    def __init__(self):
        self.received: int | None = None
        self.interruptible = True
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            _log("SIGUSR1: serving on until the trainer is done (it checkpoints and disconnects)")
            return
        self.received = signum
        if self.interruptible:
            raise _Stop()
        _log("SIGTERM: serving on until the trainer disconnects")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _group_devices(local_rank: int, tp: int) -> list[str] | None:
    """CUDA: the GPUs of this TP group, as ids of the devices this task sees (CUDA_VISIBLE_DEVICES
    may already be a remapped list from Slurm's GRES); None on machines without CUDA."""
    from megatron_grpo.platform import detect

    if not detect().cuda:
        return None
    import torch

    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible or [str(i) for i in range(torch.cuda.device_count())]
    if local_rank + tp > len(ids):
        raise ValueError(f"rollout.tp={tp}: local rank {local_rank} needs GPUs {local_rank}..{local_rank + tp - 1} "
                         f"but this task sees {len(ids)}")
    return ids[local_rank:local_rank + tp]


class _Replica:
    """The vLLM engine of one replica and the commands the trainer sends it."""

    def __init__(self, cfg: DictConfig, devices):
        self.cfg, self.devices = cfg, devices
        self.engine_cfg = self.runner = None

    def own_engine_config(self):
        from megatron_grpo.trainer import components as C

        return C.engine_config(self.cfg, max_model_len=C.max_model_len(self.cfg))

    def start(self) -> None:
        from megatron_grpo.platform import detect
        from megatron_grpo.rollout.disaggregated import start_engine

        t0 = time.monotonic()
        self.engine_cfg = self.own_engine_config()
        self.runner = start_engine(self.engine_cfg, platform=detect(), devices=self.devices)
        _log(f"vLLM engine up in {time.monotonic() - t0:.1f} s (model {self.engine_cfg.model}, "
             f"tp {self.engine_cfg.tensor_parallel_size}, devices {self.devices or 'cpu'})")

    # -- commands ------------------------------------------------------------------------------------
    def welcome(self, info: dict):
        trainer = info["engine"]
        if self.runner is None:
            self.start()
        mine = asdict(self.engine_cfg)
        diff = [f"{k}: trainer {trainer.get(k)!r}, server {v!r}" for k, v in mine.items() if trainer.get(k) != v]
        if diff:
            raise ValueError(f"the rollout server's engine settings differ from the trainer's ({'; '.join(diff)}): "
                             "run both steps with the same config and overrides")
        _log(f"replica {info['replica']} of {info['replicas']}")
        return os.getpid()

    def init_transfer(self, host, port, world, rank_offset, backend, timeout_s):
        return self.runner.rpc("mgrpo_init_transfer_group", host, int(port), int(world), int(rank_offset), backend,
                               float(timeout_s))

    def generate(self, prompts, indices, sampling, seed, weight_version):
        return self.runner.generate(prompts, indices, sampling, seed, weight_version)

    def score(self, sequences):
        return self.runner.score(sequences)

    def begin_update(self):
        self.runner.rpc("mgrpo_begin_update")

    def recv_bucket(self, meta_wire):
        return sum(self.runner.rpc("mgrpo_recv_bucket", meta_wire))

    def end_update(self):
        missing = self.runner.rpc("mgrpo_end_update")
        self.runner.llm.reset_prefix_cache()
        return sorted({n for per in missing for n in per})

    def reload_from_path(self, folder):
        self.runner.rpc("mgrpo_reload_from_path", str(folder))
        self.runner.llm.reset_prefix_cache()
        return []

    def checksum(self):
        return float(self.runner.rpc("mgrpo_param_checksum")[0])

    def worker_pids(self):
        return [int(p) for p in self.runner.rpc("mgrpo_pid")]

    COMMANDS = ("welcome", "init_transfer", "generate", "score", "begin_update", "recv_bucket", "end_update",
                "reload_from_path", "checksum", "worker_pids")

    def close(self) -> None:
        from megatron_grpo.rollout.disaggregated import stop_engine

        if self.runner is not None:
            stop_engine(self.runner)
        self.runner = None


def _serve(conn, replica: _Replica) -> str:
    """Answer the trainer's commands until shutdown or disconnect; returns why it ended."""
    while True:
        try:
            cmd, *args = conn.recv()
        except (EOFError, OSError):
            return "the trainer disconnected"
        if cmd == "shutdown":  # answered once the engine is down: the trainer's step outlives this one
            return "shutdown by the trainer"
        if cmd == "error":  # the trainer refused this server (e.g. a config mismatch): its reason, verbatim
            raise ValueError(f"the trainer refused this rollout server: {args[0]}")
        try:
            if cmd not in replica.COMMANDS:
                raise ValueError(f"unknown command {cmd!r}")
            reply = ("ok", getattr(replica, cmd)(*args))
        except Exception as e:  # reported to the trainer, which raises it; the server keeps serving
            text = str(e).strip()
            kind = "input" if isinstance(e, INPUT_ERRORS) else "runtime"
            reply = ("error", kind, f"{type(e).__name__}: {text.splitlines()[0] if text else ''}")
        try:
            conn.send(reply)
        except OSError:
            return "the trainer disconnected"


def _follow_leader(leader: int, timeout_s: float) -> int:
    """A non-leading rank of a TP group: its leader's engine uses this rank's GPU; stay until the
    leader is done (a key in the rollout world's store), the store is gone, or SIGTERM."""
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    _log(f"part of rollout TP group led by rank {leader}: waiting for it to finish")
    try:
        while not store.check([f"leader_done/{leader}"]):
            time.sleep(1.0)
    except _Stop:
        return 0
    except Exception:  # the store's host (rank 0) is gone: the run is over
        pass
    return 0


def run_rollout_server(cfg: DictConfig) -> int:
    """Entry point for ``GRPO_ROLE=rollout``; returns the process exit code."""
    signals = _Signals()
    try:
        return _run(cfg, signals)
    except _Stop:
        _log("SIGTERM before a trainer connected: exiting")
        return 0
    finally:
        signals.restore()


def _run(cfg: DictConfig, signals: _Signals) -> int:
    tp = int(cfg.rollout.tp)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 0) or None
    if local_world is not None and local_world % tp:
        raise ValueError(f"rollout.tp={tp} does not fit the rollout nodes' {local_world} ranks (LOCAL_WORLD_SIZE): "
                         "a vLLM TP group must lie within one node")
    if world % tp:
        raise ValueError(f"rollout.tp={tp} does not divide the rollout world size {world} (WORLD_SIZE)")
    address = control.transfer_address()
    if address is None:
        raise ValueError("GRPO_ROLE=rollout needs GRPO_TRANSFER_ADDR and GRPO_TRANSFER_PORT (training rank 0's "
                         "host and port; slurm/grpo_disaggregated.sh sets them)")
    addr, port = address
    timeout_s = float(cfg.parallel.timeout_s)
    deadline = time.monotonic() + timeout_s
    store = None
    if tp > 1 and world > 1:  # the TP group's other ranks wait on the rollout world's store
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ValueError(f"rollout.tp={tp} with {world} rollout ranks needs {' and '.join(missing)} (the rollout "
                             "world's rendezvous; slurm/grpo_disaggregated.sh sets them)")
        if rank % tp:
            return _follow_leader(rank - rank % tp, timeout_s)
        import torch.distributed as dist
        from datetime import timedelta

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=rank == 0,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    control.resolve(addr, port)  # a wrong host name fails now, not after the engine start
    replica = _Replica(cfg, _group_devices(local_rank, tp))
    conn = None
    try:
        if (Path(cfg.model.path) / "config.json").is_file():
            replica.start()  # overlaps the trainer's start-up; otherwise the model comes from the trainer's assets
        _log(f"connecting to the trainer at {addr}:{port}")
        conn = control.connect(addr, port, control.authkey(addr, port), deadline)
        conn.send(("hello", {"rank": rank, "world": world, "tp": tp, "host": socket.gethostname(),
                             "pid": os.getpid()}))
        signals.interruptible = False
        why = _serve(conn, replica)
        _log(f"{why}: exiting")
        return 0
    finally:
        signals.interruptible = False
        replica.close()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(("ok", None))  # the trainer waits for this (shutdown) or has gone
            conn.close()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(f"leader_done/{rank}", "1")
