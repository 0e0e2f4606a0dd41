"""The trainer's side of rollout servers on their own nodes (``slurm/grpo_disaggregated.sh``).

Same API as :class:`~megatron_grpo.rollout.disaggregated.DisaggregatedEngine`, but the vLLM engines
are rollout servers (``megatron_grpo.rollout.server``) in another job step. The trainer's driver
rank (0) listens at ``GRPO_TRANSFER_ADDR:GRPO_TRANSFER_PORT``, waits for every replica (one server
per vLLM TP group of the rollout world), and then:

* generate / score: prompts are split contiguously across replicas (``chunk_bounds``), each prompt
  keeps the seed of its global index (``prompt_seed``), so results do not depend on the number of
  replicas; the driver gathers them in prompt order and broadcasts the batch to every trainer rank;
* weights: one ``TransferGroup`` holds the driver (rank 0) and every vLLM worker of every replica
  (replica r, worker w: rank ``1 + r * tp + w``). Per bucket the driver sends the metadata to all
  servers, broadcasts one packed buffer, and collects their acknowledgements. With
  ``rollout.weights_path`` buckets go through a shared folder instead (``FsWeightWriter``).

Errors on the driver (no server in time, a server that fails or disconnects) are raised on every
trainer rank with the same one-line message.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_grpo.distributed.ports import free_port
from megatron_grpo.platform import detect
from megatron_grpo.rollout import control
from megatron_grpo.rollout.config import EngineConfig
from megatron_grpo.rollout.disaggregated import DriverOwnedEngine, FsWeightWriter, transfer_backend
from megatron_grpo.rollout.engine import chunk_bounds
from megatron_grpo.rollout.packing import pack_bucket
from megatron_grpo.rollout.transfer_group import TransferGroup
from megatron_grpo.rollout.types import RolloutBatch, SamplingConfig

log = logging.getLogger(__name__)


class RolloutServerError(RuntimeError):
    pass


class _Server:
    """One connected rollout server (one vLLM replica)."""

    def __init__(self, conn, hello: dict):
        self.conn, self.hello = conn, hello
        self.rank, self.host = int(hello["rank"]), str(hello.get("host", "?"))
        self.replica = -1

    def __str__(self) -> str:
        return f"rollout server {self.replica} (rank {self.rank} on {self.host})"

    def send(self, *msg) -> None:
        try:
            self.conn.send(msg)
        except OSError as e:
            raise RolloutServerError(f"{self} is gone ({e.strerror or type(e).__name__})") from None

    def reply(self, timeout_s: float | None = None):
        try:
            if timeout_s is not None and not self.conn.poll(timeout_s):
                raise RolloutServerError(f"{self} did not answer within {timeout_s:.0f} s")
            status, *value = self.conn.recv()
        except (EOFError, OSError):
            raise RolloutServerError(f"{self} disconnected (did its process die? see the rollout step's log)") from None
        if status == "ok":
            return value[0]
        kind, text = value
        # a bad input on the server (config mismatch, ...) is reported like the trainer's own: one line
        raise (ValueError if kind == "input" else RolloutServerError)(f"{self}: {text}")


class RemoteEngine(DriverOwnedEngine):
    """vLLM replicas served from other nodes, driven by the trainer's driver rank."""

    placement = "disaggregated"

    def __init__(self, cfg: EngineConfig, *, addr: str, port: int, replicas: int | None = None,
                 transport: str = "pg", weights_path: str | None = None, driver_rank: int = 0,
                 timeout_s: float = 600.0, keep_versions: int = 1):
        import torch.distributed as dist

        if transport not in ("pg", "fs"):
            raise ValueError(f"transport must be 'pg' or 'fs', got {transport!r}")
        if transport == "fs" and not weights_path:
            raise ValueError("transport='fs' needs weights_path (a folder the rollout servers can read)")
        self.cfg, self.transport, self.driver_rank = cfg, transport, int(driver_rank)
        self.addr, self.port, self.timeout_s = addr, int(port), float(timeout_s)
        self.platform = detect()
        self.weight_version = 0
        self.last_not_loaded: list[str] = []
        self._dist = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_driver = self.rank == self.driver_rank
        self.servers: list[_Server] = []
        self._group = None
        self._fs = FsWeightWriter(Path(weights_path), keep_versions) if transport == "fs" else None
        self._from_driver(lambda: self._start(replicas))

    # -- start-up (driver) -------------------------------------------------------------------------
    def _start(self, replicas: int | None) -> None:
        t0 = time.monotonic()
        try:
            self.servers = self._accept(replicas)
            self._call_all("welcome", lambda s: ({"replica": s.replica, "replicas": len(self.servers),
                                                  "engine": asdict(self.cfg)},), timeout_s=self.timeout_s)
            if self.transport == "pg":
                self._connect_transfer_group()
        except BaseException as e:
            for s in self.servers:  # tell the servers why, so that their step's log says it too
                with contextlib.suppress(Exception):
                    s.send("error", str(e))
                    s.conn.close()
            self.servers = []
            raise
        print(f"[megatron-grpo] {len(self.servers)} rollout replica(s) ready in {time.monotonic() - t0:.1f} s: "
              + ", ".join(f"replica {s.replica} on {s.host} (rollout rank {s.rank})" for s in self.servers), flush=True)

    def _accept(self, replicas: int | None) -> list[_Server]:
        tp = self.cfg.tensor_parallel_size
        key = control.authkey(self.addr, self.port)
        deadline = time.monotonic() + self.timeout_s
        listener = control.listen(self.addr, self.port)
        found: dict[int, _Server] = {}
        seen: list[_Server] = []
        try:
            while replicas is None or len(found) < replicas:
                want = "?" if replicas is None else replicas
                conn = control.accept(listener, key, deadline,
                                      what=f"rollout server ({len(found)}/{want} replicas after {self.timeout_s:.0f} s)")
                if not conn.poll(30):
                    conn.close()
                    continue
                tag, hello = conn.recv()
                server = _Server(conn, hello)
                seen.append(server)
                found_tp, world = int(hello["tp"]), int(hello["world"])
                if tag != "hello" or found_tp != tp:
                    raise ValueError(f"rollout server rank {server.rank} on {server.host} runs rollout.tp={found_tp}, "
                                     f"the trainer rollout.tp={tp}: both steps need the same config")
                replicas = replicas if replicas is not None else world // tp
                if world // tp != replicas:
                    raise ValueError(f"rollout server rank {server.rank} on {server.host} reports a rollout world of "
                                     f"{world} ranks = {world // tp} replicas; the trainer expects {replicas} "
                                     "(GRPO_ROLLOUT_WORLD_SIZE / rollout.tp)")
                server.replica = server.rank // tp
                if server.replica in found:
                    raise ValueError(f"two rollout servers claim replica {server.replica} (ranks "
                                     f"{found[server.replica].rank} and {server.rank})")
                found[server.replica] = server
        except BaseException:
            self.servers = seen  # _start tells them why and closes them
            raise
        finally:
            listener.close()
        return [found[r] for r in sorted(found)]

    def _connect_transfer_group(self) -> None:
        tp, backend = self.cfg.tensor_parallel_size, transfer_backend(self.platform)
        port, world = free_port(self.addr), 1 + len(self.servers) * tp
        for s in self.servers:
            s.send("init_transfer", self.addr, port, world, 1 + s.replica * tp, backend, self.timeout_s)
        self._group = TransferGroup.connect(self.addr, port, rank=0, world_size=world, backend=backend,
                                            timeout_s=self.timeout_s)
        for s in self.servers:
            s.reply()

    def _call_all(self, cmd: str, args=lambda s: (), timeout_s: float | None = None) -> list:
        """Send one command to every server (they work in parallel), then collect the results in order."""
        for s in self.servers:
            s.send(cmd, *args(s))
        return [s.reply(timeout_s) for s in self.servers]

    # -- generation ----------------------------------------------------------------------------------
    def _split(self, n: int) -> list[tuple[int, int]]:
        return chunk_bounds(n, len(self.servers))

    def generate(self, prompts: Sequence, sampling: SamplingConfig, seed: int) -> RolloutBatch:
        """Full batch on every trainer rank (G contiguous completions per prompt, prompt order)."""
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]

        def run():
            bounds = self._split(len(prompts))
            parts = self._call_all("generate", lambda s: (prompts[bounds[s.replica][0]:bounds[s.replica][1]],
                                                          list(range(*bounds[s.replica])), sampling, int(seed),
                                                          self.weight_version))
            return RolloutBatch.concat(parts)

        return self._from_driver(run)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        sequences = [[int(t) for t in s] for s in sequences]

        def run():
            bounds = self._split(len(sequences))
            parts = self._call_all("score", lambda s: (sequences[bounds[s.replica][0]:bounds[s.replica][1]],))
            return [row for part in parts for row in part]

        return self._from_driver(run)

    # -- weight updates (the bridge calls these on every rank; only the driver acts) -----------------
    def begin_weight_update(self) -> None:
        if not self.is_driver:
            return
        if self.transport == "pg":
            self._call_all("begin_update")
        else:
            self._fs.begin(self.weight_version + 1)

    def load_bucket(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.is_driver:
            raise RuntimeError("load_bucket on a non-driver rank of a remote engine")
        if self.transport == "fs":
            self._fs.write(weights)
            return
        buf, meta = pack_bucket(list(weights))
        wire = meta.to_wire()
        for s in self.servers:
            s.send("recv_bucket", wire)
        self._group.broadcast(buf, src=0)
        for s in self.servers:
            s.reply()

    def end_weight_update(self, version: int | None = None) -> int:
        new_version = self.weight_version + 1 if version is None else int(version)
        if self.is_driver:
            if self.transport == "pg":
                missing = self._call_all("end_update")
            else:
                missing = self._call_all("reload_from_path", lambda s: (str(self._fs.folder),))
                self._fs.prune()
            self.last_not_loaded = sorted({n for per in missing for n in per})
            if self.last_not_loaded:
                log.warning("weight update left vLLM parameters untouched: %s", self.last_not_loaded)
        self.weight_version = new_version
        return new_version

    def checksum(self) -> float:
        """Replica 0's first worker (every replica gets the same bytes)."""
        return self._from_driver(lambda: float(self._call_all("checksum")[0]))

    def worker_pids(self) -> list[int]:
        return self._from_driver(lambda: [int(p) for per in self._call_all("worker_pids") for p in per])

    def shutdown(self) -> None:
        """Stop the servers and wait until their engines are down and they hang up (so the rollout
        step ends before the training step: the batch script then sees it exit 0); never raises."""
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.send("shutdown")
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.reply(timeout_s=120)
                if s.conn.poll(30):
                    s.conn.recv()  # EOFError: the server closed its end
            with contextlib.suppress(Exception):
                s.conn.close()
        if self._group is not None:
            self._group.close()
        self.servers, self._group = [], None


def replicas_from_env(rollout_tp: int) -> int | None:
    """Replicas the trainer waits for: ``GRPO_ROLLOUT_WORLD_SIZE / rollout.tp`` (None: from the servers)."""
    world = os.environ.get("GRPO_ROLLOUT_WORLD_SIZE")
    if not world:
        return None
    if not world.isdigit() or int(world) < 1 or int(world) % rollout_tp:
        raise ValueError(f"GRPO_ROLLOUT_WORLD_SIZE={world} must be a positive multiple of rollout.tp={rollout_tp}")
    return int(world) // rollout_tp
