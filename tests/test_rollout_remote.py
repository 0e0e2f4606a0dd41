"""Rollout servers on their own "nodes" (GRPO_ROLE=rollout) feeding a real trainer (GRPO_ROLE=train).

What slurm/grpo_disaggregated.sh runs, without Slurm: each rollout server is `megatron-grpo train`
with GRPO_ROLE=rollout and its own RANK/WORLD_SIZE; the trainer is a 2-rank torchrun job whose rank 0
listens at GRPO_TRANSFER_ADDR:GRPO_TRANSFER_PORT. Real vLLM, real megatron-core, real rewards.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_grpo.distributed.ports import free_port
from tests.e2e import (CONFIG, REPO, SHM, alive, descendants, env, error_lines, kill_tree, metrics, run_train,
                       shm_files, socket_files, train_cmd)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]  # see tests/conftest.py
pytestmark = [*pytestmark, pytest.mark.vllm]  # the 3.12 lane has no vLLM

# Two steps: step 2 runs on weights the trainer pushed after step 1's update (weights v1 and v2, so the
# filesystem transport also prunes one); 4 prompts x 4 completions: 2 prompts per replica and rank.
STEPS = 2
COMMON = ("trainer.eval_steps=0", "checkpoint.save_steps=0", "trainer.export_at_end=false",
          "logging.tensorboard=false", f"trainer.max_steps={STEPS}", "algorithm.num_prompts_per_step=4",
          "rollout.num_generations=4")
KEYS = ("reward/mean", "train/loss", "completion/length_mean", "reward/std")


def _role_env(role: str, port: int, **extra) -> dict:
    e = env()
    e.update(GRPO_ROLE=role, GRPO_TRANSFER_ADDR="127.0.0.1", GRPO_TRANSFER_PORT=str(port))
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _server(rank: int, world: int, port: int, overrides, log_path, **extra):
    """One rollout server, as one task of the rollout step would run it."""
    e = _role_env("rollout", port, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                  GRPO_TRAIN_WORLD_SIZE=2, **extra)
    return subprocess.Popen(train_cmd(*overrides), cwd=REPO, env=e, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _trainer(port: int, rollout_world: int, overrides, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megatron_grpo.cli", "train",
           "--config", str(CONFIG), *overrides]
    e = _role_env("train", port, GRPO_ROLLOUT_WORLD_SIZE=rollout_world, GRPO_TRAIN_WORLD_SIZE=2)
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def _remote_run(tmp_path, name: str, servers: int, overrides, **server_env):
    """Start `servers` rollout ranks and the 2-rank trainer; returns (trainer, [(rc, log)], seconds)."""
    port = free_port()  # below the ephemeral range: the servers' vLLM processes open many sockets first
    procs = [_server(r, servers, port, overrides, tmp_path / f"{name}_server{r}.log", **server_env)
             for r in range(servers)]
    t0 = time.monotonic()
    try:
        trainer = _trainer(port, servers, overrides)
        if trainer.returncode != 0:  # the servers would wait out their timeout for it: show why it ended
            _ok(trainer)
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    return trainer, [(rc, (tmp_path / f"{name}_server{r}.log").read_text()) for r, rc in enumerate(rcs)], \
        time.monotonic() - t0


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def _rows(out):
    return [{k: r[k] for k in ("step", *KEYS)} for r in metrics(out)]


def test_rollout_servers_feed_the_trainer_like_colocated_vllm(assets, tmp_path):
    """Per-step rewards, loss and lengths of a 2-rank trainer fed by rollout servers equal those of
    the same run with vLLM colocated in the 2 training ranks (2 replicas), bit for bit: with two
    servers (2 replicas; one transfer process group of the driver and both engines' workers) and with
    one server (1 replica, weights through rollout.weights_path). Every server exits 0 when training
    ends."""
    common = [*assets, *COMMON]
    colocated = tmp_path / "colocated"
    _ok(run_train(*common, f"trainer.output_dir={colocated}", nproc=2))
    expected = _rows(colocated)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    runs = {"pg-2-servers": (2, []), "fs-1-server": (1, [f"rollout.weights_path={tmp_path / 'weights'}"])}
    for name, (servers, extra) in runs.items():
        out = tmp_path / name
        trainer, server_results, seconds = _remote_run(
            tmp_path, name, servers, [*common, "rollout.placement=disaggregated", f"trainer.output_dir={out}", *extra])
        print(f"{name}: {seconds:.1f} s")
        _ok(trainer)
        for rank, (rc, log) in enumerate(server_results):
            assert rc == 0, f"server {rank} exit {rc}\n{log[-4000:]}"
            assert f"replica {rank} of {servers}" in log and "shutdown by the trainer: exiting" in log, log[-4000:]
        parity = next(line for line in trainer.stdout.splitlines() if "step-1 logprob parity" in line)
        assert float(parity.rsplit(":", 1)[1]) <= 1e-3, parity
        assert _rows(out) == expected, (name, _rows(out), expected)
        assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [f"v{STEPS}"]  # older versions pruned


def _server_alone(tmp_path, name, *overrides, **env_extra):
    port = env_extra.pop("port", None) or free_port()
    e = _role_env("rollout", port, RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1)
    e.update({k: str(v) for k, v in env_extra.items()})
    return subprocess.Popen(train_cmd(*overrides, f"trainer.output_dir={tmp_path / name}"), cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _read_until(proc, text: str, timeout: float) -> str:
    deadline, seen = time.monotonic() + timeout, ""
    while text not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, (proc.poll(), seen)
        seen += proc.stdout.readline()
    return seen


@pytest.mark.timeout(2700)
def test_rollout_server_and_trainer_fail_fast_with_one_line(assets, tmp_path):
    """A wrong host name, nothing listening, a bad TP shape, a colocated config, SIGTERM while waiting,
    a trainer whose GRPO_TRANSFER_ADDR is not its own, and a server whose engine settings differ from
    its trainer's: each ends with one `error:` line (exit 0 for the signal). Two servers with their
    vLLM engine up are SIGKILLed: one with all its processes (what torchrun's or a user's kill -9 of a
    process group does), one alone (the OOM killer): neither leaves vLLM processes, /dev/shm files or the
    socket files of vLLM's ZMQ channels behind (nor does anything else here: ``no_shm_leak``). All run at
    once."""
    not_yet = [f"model.path={tmp_path / 'model-made-by-the-trainer'}", assets[1]]  # server connects before vLLM
    common = ["rollout.placement=disaggregated", *COMMON]
    t0 = time.monotonic()
    procs = {
        "bad host": _server_alone(tmp_path, "a", *assets, *common, GRPO_TRANSFER_ADDR="no-such-host.invalid"),
        "refused": _server_alone(tmp_path, "b", *not_yet, *common, "parallel.timeout_s=3"),
        "tp split": _server_alone(tmp_path, "c", *assets, *common, "rollout.tp=2", WORLD_SIZE=6, LOCAL_WORLD_SIZE=3),
        "colocated": _server_alone(tmp_path, "d", *assets, *COMMON),
        "sigterm": _server_alone(tmp_path, "e", *not_yet, *common, "parallel.timeout_s=600"),
        "no rendezvous": _server_alone(tmp_path, "g", *assets, *common, "rollout.tp=2", WORLD_SIZE=2,
                                       LOCAL_WORLD_SIZE=2, MASTER_ADDR="", MASTER_PORT=""),
        "killed": _server_alone(tmp_path, "h", *assets, *common, "parallel.timeout_s=900"),  # engine up, no trainer
        "killed alone": _server_alone(tmp_path, "i", *assets, *common, "parallel.timeout_s=900"),
    }
    mismatch_port = free_port()
    procs["mismatch server"] = _server_alone(tmp_path, "f", *assets, *common, "rollout.kv_cache_memory_mb=32",
                                             port=mismatch_port)
    trainers = {
        "trainer": _role_env("train", free_port(), GRPO_TRANSFER_ADDR="192.0.2.1"),  # not this machine's address
        "mismatch trainer": _role_env("train", mismatch_port, GRPO_ROLLOUT_WORLD_SIZE=1),
    }
    for name, trainer_env in trainers.items():
        procs[name] = subprocess.Popen(train_cmd(*assets, *common, f"trainer.output_dir={tmp_path / name}"),
                                       cwd=REPO, env=trainer_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)
    engines, left = {}, {}  # killed server -> (its processes, its /dev/shm files, its sockets); what remains
    try:
        # generous: eleven processes start at once here, on 2 cores shared with the rest of the suite
        seen = _read_until(procs["sigterm"], "connecting to the trainer", timeout=600)
        procs["sigterm"].send_signal(signal.SIGTERM)  # while it retries its connection
        for name in ("killed", "killed alone"):
            _read_until(procs[name], "connecting to the trainer", timeout=900)  # its vLLM engine is up
            pids = descendants(procs[name].pid)
            engines[name] = (pids, shm_files(pids), socket_files([procs[name].pid, *pids]))
        kill_tree(procs["killed"].pid)
        procs["killed alone"].kill()
        for name in engines:  # not communicate(): orphans of a killed server would hold its pipes open
            killed = procs.pop(name)
            killed.wait(timeout=60)
            killed.stdout.close()
            killed.stderr.close()
        results = {name: (p.wait(timeout=900), *p.communicate()) for name, p in procs.items()}
        results["sigterm"] = (results["sigterm"][0], seen + results["sigterm"][1], results["sigterm"][2])
        deadline = time.monotonic() + 30
        while True:
            left = {name: (alive(pids), sorted(f for f in files if (SHM / f).exists()),
                           sorted(s for s in sockets if os.path.exists(s)))
                    for name, (pids, files, sockets) in engines.items()}
            if not any(any(x) for x in left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill_tree(p.pid)
        for pids, files, sockets in engines.values():  # what a killed server left, if anything: this test cleans up
            for pid in alive(pids):
                os.kill(pid, signal.SIGKILL)
            for f in files:
                (SHM / f).unlink(missing_ok=True)
            for s in sockets:
                Path(s).unlink(missing_ok=True)
    print(f"all done in {time.monotonic() - t0:.1f} s")
    expected = {
        "bad host": "GRPO_TRANSFER_ADDR=no-such-host.invalid: cannot resolve the host name",
        "refused": "no trainer reachable at 127.0.0.1:",
        "tp split": "rollout.tp=2 does not fit the rollout nodes' 3 ranks (LOCAL_WORLD_SIZE)",
        "colocated": "GRPO_ROLE=rollout needs rollout.placement=disaggregated",
        "no rendezvous": "rollout.tp=2 with 2 rollout ranks needs MASTER_ADDR and MASTER_PORT",
        "trainer": "cannot listen for rollout servers at 192.0.2.1:",
        # both steps must run the same engine settings: the trainer and the server each say so in one line
        "mismatch trainer": "engine settings differ from the trainer's (kv_cache_memory_bytes: trainer 67108864, "
                            "server 33554432)",
        "mismatch server": "the trainer refused this rollout server: rollout server 0 (rank 0 on",
    }
    for name, text in expected.items():
        rc, out, err = results[name]
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and text in lines[0], (name, rc, lines, err[-3000:])
    rc, out, err = results["sigterm"]
    assert rc == 0 and not error_lines(err) and "SIGTERM before a trainer connected" in out, (rc, out, err[-3000:])
    for name, (pids, files, sockets) in engines.items():
        assert any(f.startswith("psm_") for f in files), (name, files)  # vLLM's message queues, seen mapped
        assert sockets, name  # vLLM's ZMQ channels, seen bound
    assert all(v == ([], [], []) for v in left.values()), \
        f"(processes still running, files still in {SHM}, socket files still there): {left}"


def test_rollout_server_with_vllm_tp2_spans_two_ranks(assets, tmp_path):
    """rollout.tp=2: rank 0 of the rollout world hosts one vLLM TP=2 engine, rank 1 waits for it; the
    trainer's weights reach both vLLM workers (step-1 Megatron vs vLLM logprob parity) and both exit 0."""
    overrides = [*assets, *COMMON, "rollout.placement=disaggregated", "rollout.tp=2",
                 f"trainer.output_dir={tmp_path / 'run'}"]
    trainer, servers, seconds = _remote_run(tmp_path, "tp2", 2, overrides, MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=free_port())
    print(f"tp2 server run: {seconds:.1f} s")
    _ok(trainer)
    assert [rc for rc, _ in servers] == [0, 0], servers
    assert "tp 2" in servers[0][1], servers[0][1][-2000:]  # the leader's engine line
    parity = next(line for line in trainer.stdout.splitlines() if "step-1 logprob parity" in line)
    assert float(parity.rsplit(":", 1)[1]) <= 1e-3, parity
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, STEPS + 1))
