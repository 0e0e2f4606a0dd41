"""`train --nproc-per-node`'s launcher under a process-group signal (scancel, timeout, Ctrl-C): the
launcher survives, torchrun's stand-in (an agent whose workers live in sessions of their own, as
torchrun's do, and which dies with a traceback-like exit 1 if signalled) never sees the signal, the
worker gets it once, finishes its work and exits 0, and the launcher returns that exit code."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e import REPO, env

AGENT = r"""
import signal, subprocess, sys
def hit(signum, frame):
    open(sys.argv[1] + "/agent_signalled", "w").write(str(signum)); sys.exit(1)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, hit)
worker = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], start_new_session=True)
sys.exit(worker.wait())
"""

WORKER = r"""
import os, signal, sys, time
got = []
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: got.append(signum))
open(sys.argv[1] + "/ready", "w").write(str(os.getpid()))
while not got:
    time.sleep(0.01)
time.sleep(0.5)  # "the checkpoint": a second delivery would show up in got
open(sys.argv[1] + "/saved", "w").write(",".join(map(str, got)))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["term", "int", "usr1"])
def test_group_signal_reaches_the_ranks_once_and_not_torchrun(tmp_path, signum):
    code = ("import sys; from megatron_grpo.launch import run_forwarding_signals; "
            "sys.exit(run_forwarding_signals([sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]]))")
    proc = subprocess.Popen([sys.executable, "-c", code, AGENT, str(tmp_path), WORKER], cwd=REPO, env=env(),
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signum)  # the launcher's whole process group, as Slurm/timeout/Ctrl-C do
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "saved").read_text() == str(int(signum))
    assert not (tmp_path / "agent_signalled").exists()
