"""errors.report under a launcher: rank 0 says the one line; the other ranks must not leave first.

torchrun (and srun with --kill-on-bad-exit) stop every rank at the first exit: a rank 1 that left at once
killed rank 0 before its line was out (CI: a failed 2-rank step-1 parity check ended with exit 2 and no
line). Real processes and real signals, no launcher stand-in needed for the timing itself.
"""
import os
import signal
import subprocess
import sys
import time

CODE = ("import sys; from megatron_grpo.errors import report; print('reporting', flush=True); "
        "code = report(ValueError('model.path: no such folder\\nsecond line')); print('returned', code, flush=True)")


def _start(rank: str, world: str):
    env = {"RANK": rank, "WORLD_SIZE": world, "PYTHONPATH": "."}
    return subprocess.Popen([sys.executable, "-c", CODE], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_rank0_reports_one_line_and_returns_at_once():
    proc = _start("0", "2")
    out, err = proc.communicate(timeout=60)
    assert err.splitlines() == ["error: model.path: no such folder"] and "returned 2" in out


def test_other_ranks_wait_for_the_launcher_and_its_stop_ends_them():
    proc = _start("1", "2")
    assert proc.stdout.readline() == "reporting\n"  # imports done (however loaded the machine), report called
    time.sleep(1)
    assert proc.poll() is None, "rank 1 left before rank 0 could report"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # what torchrun does once rank 0 has exited
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 5
    assert err == "" and "returned" not in out  # no line of its own, no traceback


def test_a_single_process_does_not_wait():
    proc = _start("0", "1")
    out, err = proc.communicate(timeout=60)
    assert "returned 2" in out and err.startswith("error: ")
    t0 = time.monotonic()
    proc = _start("1", "1")  # RANK without a world (a stray environment): nothing to wait for
    proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20
