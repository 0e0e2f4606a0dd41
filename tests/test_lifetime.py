"""megatron_grpo/lifetime.py: a process forked by a training rank dies with it (and only then)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e import REPO, alive

PARENT = r"""
import os, sys, time
if sys.argv[1] == "install":
    from megatron_grpo.lifetime import forked_children_die_with_this_process
    forked_children_die_with_this_process()
    forked_children_die_with_this_process()  # idempotent: one handler, not two
pid = os.fork()  # what multiprocessing's fork context does for megatron's checkpoint writers
if pid == 0:
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
time.sleep(600)
"""


def _fork_then_kill_parent(mode: str) -> tuple[int, bool]:
    """Start a parent that forks a sleeping child; SIGKILL the parent; is the child gone 10 s later?"""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    assert alive([child])  # the child runs while its parent does
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive([child]) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not alive([child])
    if not gone:
        os.kill(child, signal.SIGKILL)
    return child, gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_forked_children_die_with_their_parent_only_once_installed():
    assert _fork_then_kill_parent("install")[1], "the forked child outlived its SIGKILLed parent"
    assert not _fork_then_kill_parent("plain")[1], "without the handler the child should have stayed (control)"
