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


ENDING = r"""
import atexit, multiprocessing, sys, time
from pathlib import Path
out = Path(sys.argv[2])

class Teardown:  # a module global's finaliser runs only in the interpreter's teardown
    def __del__(self):
        out.joinpath("teardown").write_text("ran")

keep = Teardown()
atexit.register(lambda: out.joinpath("atexit").write_text("ran"))
if __name__ == "__main__":
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=True)
    child.start()  # multiprocessing's own atexit handler ends daemonic children
    out.joinpath("child").write_text(str(child.pid))
    print("unflushed", end="")  # in the pipe's buffer until someone flushes stdout
    if sys.argv[1] == "fast":
        from megatron_grpo.lifetime import exit_without_teardown
        exit_without_teardown(3)
    sys.exit(3)
"""


@pytest.mark.parametrize("mode", ["fast", "normal"])
def test_exit_without_teardown_is_a_normal_exit_less_the_teardown(tmp_path, mode):
    """Exit code, atexit handlers (multiprocessing ends its children there), flushed output: as sys.exit;
    the interpreter's teardown (finalisers of module globals, whole-heap garbage collection) is skipped.
    ``normal`` is the control: the same script ending with sys.exit does run the teardown."""
    proc = subprocess.run([sys.executable, "-c", ENDING, mode, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "unflushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 10
    while alive([child]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive([child]), "multiprocessing's atexit handler did not end the daemonic child"
    assert (tmp_path / "teardown").exists() == (mode == "normal")
