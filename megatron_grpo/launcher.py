"""`train --nproc-per-node N`: run torchrun in a session of its own and hand the job's signals to the ranks.

Slurm's scancel/preemption, `timeout` and Ctrl-C signal a whole process group. Left in that group,
torchrun would take SIGTERM/SIGINT itself (its handler kills the ranks after a grace period and ends
in a SignalException traceback) and SIGUSR1 would kill it outright, while this parent died of the
default action and returned to the shell with the job still running. Instead: torchrun runs in
its own session (group signals miss it), this parent catches SIGTERM/SIGINT/SIGUSR1 and forwards each
once to the rank processes, which checkpoint the current step and exit 0; torchrun then sees clean
exits, and this parent returns its exit code. Stdlib only: no torch import in the parent.
"""
from __future__ import annotations

import os
import signal
import subprocess

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def run_forwarding_signals(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, frame):
        ranks = _children(proc.pid)  # torchrun's workers (each in a session of its own)
        for pid in ranks or [proc.pid]:  # before the ranks exist: torchrun itself ends the start-up
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                return proc.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
