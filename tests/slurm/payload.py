"""A real torch.distributed job standing in for the trainer under Slurm (tests/test_slurm.py).

Same command line as the trainer, so the batch script cannot tell them apart:

    payload.py [train] --config CONFIG [key=value ...]

and the Slurm-facing behaviour the trainer must have (see slurm/README.md, "Trainer contract"):

* env:// rendezvous from RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (gloo), one process per rank;
* reads the config with the project's loader: trainer.max_steps, trainer.output_dir,
  checkpoint.save_steps / keep_last / resume, parallel.timeout_s;
* checkpoints with the trainer's directory protocol (``megatron_grpo.trainer.checkpoint``:
  ``checkpoints/step_XXXXXXXX/`` + COMPLETE marker, atomic rename, keep-last-K) and resumes from the
  newest complete one when ``checkpoint.resume=auto``;
* SIGTERM/SIGUSR1 set a flag (``PreemptionFlag``); after the current step the ranks agree on it
  (all_reduce MAX), save a checkpoint of that step and exit 0.

Records what the test asserts on, under trainer.output_dir:
  ranks/restart<R>_rank<r>.json   host, SLURM_NODEID, ranks, world, role, all_reduce result
  steps.log                       "<step> <restart>" per completed step (rank 0)
  events.jsonl                    start / preempted / done events (rank 0)
Extra knobs (environment): PAYLOAD_STEP_SECONDS (sleep per step, default 0.2).

With GRPO_ROLE=rollout (slurm/grpo_disaggregated.sh) it plays a rollout worker: joins its own world,
meets the training world's rank 0 through a TCPStore at GRPO_TRANSFER_ADDR:GRPO_TRANSFER_PORT, and
serves until the trainer says it is done or a signal arrives; it writes no checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_grpo.trainer.checkpoint import PreemptionFlag  # noqa: E402  (signals first: cheap import)

FLAG = PreemptionFlag()  # installed before torch.distributed starts: an early signal is not lost

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_grpo.config import load_config  # noqa: E402
from megatron_grpo.trainer.checkpoint import CheckpointWriter, resolve_resume  # noqa: E402


def _env_int(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _agree(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _transfer_store(role: str, rank: int, timeout_s: float):
    """The disaggregated rendezvous: training rank 0 hosts it, rollout rank 0 joins."""
    host, port = os.environ.get("GRPO_TRANSFER_ADDR"), os.environ.get("GRPO_TRANSFER_PORT")
    if not host or not port or rank != 0:
        return None
    store = dist.TCPStore(host, int(port), 2, is_master=(role == "train"), timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    store.set(f"{role}_ready", socket.gethostname())
    store.wait(["train_ready", "rollout_ready"])
    return store


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)

    role = os.environ.get("GRPO_ROLE", "train")
    restart = _env_int("SLURM_RESTART_COUNT")
    out = Path(cfg.trainer.output_dir)
    if role != "train":
        out = out / role
    step_seconds = float(os.environ.get("PAYLOAD_STEP_SECONDS", "0.2"))
    timeout_s = float(cfg.parallel.timeout_s)

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert rank == int(os.environ["RANK"]) and world == int(os.environ["WORLD_SIZE"])
    probe = torch.tensor([rank + 1])
    dist.all_reduce(probe)
    assert probe.item() == world * (world + 1) // 2, (probe.item(), world)
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    info = {
        "rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "world_size": world, "role": role,
        "hostname": socket.gethostname(), "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"), "slurm_procid": os.environ.get("SLURM_PROCID"),
        "node_rank": os.environ.get("NODE_RANK"), "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "job_id": os.environ.get("SLURM_JOB_ID"), "restart": restart, "all_reduce": probe.item(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
    }
    (out / "ranks" / f"restart{restart}_rank{rank}.json").write_text(json.dumps(info))
    store = _transfer_store(role, rank, timeout_s)
    if store is not None:
        (out / "transfer.json").write_text(json.dumps({"role": role, "train": store.get("train_ready").decode(),
                                                       "rollout": store.get("rollout_ready").decode()}))

    if role != "train":  # a rollout worker: serve until the trainer is done or we are signalled
        while True:
            done = False
            if store is not None:
                try:
                    done = store.check(["train_done"])
                except Exception:  # the trainer (store host) is gone: training is over
                    done = True
            if _agree(FLAG.set or done):
                if store is not None and done:
                    try:
                        store.set("rollout_done", "1")  # the trainer may now close the store
                    except Exception:
                        pass
                break
            time.sleep(step_seconds)
        dist.barrier()
        dist.destroy_process_group()
        return 0

    events = out / "events.jsonl"
    writer = CheckpointWriter(out / "checkpoints", keep_last=int(cfg.checkpoint.keep_last))
    resumed = resolve_resume(writer.root, str(cfg.checkpoint.resume))
    start = json.loads((resumed / "trainer_state.json").read_text())["step"] if resumed else 0
    if resumed:
        mine = json.loads((resumed / f"rank_{rank}.json").read_text())
        assert mine["step"] == start and mine["world_size"] == world, mine
    max_steps = int(cfg.trainer.max_steps)
    save_steps = int(cfg.checkpoint.save_steps)
    if rank == 0:
        _append(events, json.dumps({"event": "start", "restart": restart, "resumed_from": start, "world": world,
                                    "job": os.environ.get("SLURM_JOB_ID"), "t": time.time()}))

    def save(step: int) -> None:
        tmp = writer.begin(step, is_writer=(rank == 0))
        dist.barrier()
        (tmp / f"rank_{rank}.json").write_text(json.dumps({"step": step, "rank": rank, "world_size": world}))
        dist.barrier()
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
            writer.commit(step, {"world_size": world, "restart": restart})
        dist.barrier()

    step = start
    while step < max_steps:
        time.sleep(step_seconds)
        step += 1
        t = torch.tensor([step * 1000 + rank])
        dist.all_reduce(t)
        assert t.item() == world * step * 1000 + world * (world - 1) // 2
        if rank == 0:
            _append(out / "steps.log", f"{step} {restart}")
        preempted = _agree(FLAG.set)
        if preempted or step == max_steps or (save_steps and step % save_steps == 0):
            save(step)
        if preempted:
            if rank == 0:
                _append(events, json.dumps({"event": "preempted", "step": step, "signal": FLAG.received,
                                            "restart": restart, "t": time.time()}))
            break
    else:
        if rank == 0:
            _append(events, json.dumps({"event": "done", "step": step, "restart": restart, "t": time.time()}))
    if store is not None and rank == 0:
        store.set("train_done", "1")
        try:  # keep the store (hosted here) up until the rollout side has seen it
            store.wait(["rollout_done"], timedelta(seconds=10))
        except Exception:
            pass
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
