"""Fixtures shared by the end-to-end test modules, and the CPU-seconds report of each pytest run."""
import os
import resource
import time
from pathlib import Path

import pytest

from tests.e2e import SHM, leaked_shm, prepare_tiny_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> list[str]:
    """``model.path``/``data.path`` overrides of one tiny warm-started model and its data (made once).
    Under ``make test`` (tools/test_lanes.sh) every pytest run of the suite shares one folder,
    MEGATRON_GRPO_TEST_ASSETS: the trainer's asset step builds it under a file lock and reuses it."""
    shared = os.environ.get("MEGATRON_GRPO_TEST_ASSETS")
    return prepare_tiny_assets(Path(shared) if shared else tmp_path_factory.mktemp("assets"))


@pytest.fixture
def no_shm_leak():
    """The test leaves nothing in /dev/shm (RAM until reboot): no name that appeared during it is still
    there, unmapped by any live process, once the engine guards had time to clean up (20 s at most)."""
    before = {p.name for p in SHM.iterdir()}
    yield
    deadline = time.monotonic() + 20
    while (left := leaked_shm(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind in {SHM}: {left}"


@pytest.fixture(scope="session")
def plain_run(assets, tmp_path_factory) -> dict:
    """One uninterrupted run of the tiny config (tests/e2e.py PLAIN_RUN: 4 steps, a checkpoint each step,
    all kept), made once per session: the reference of test_group_signals' exact resume, and the run that
    test_resume_branch branches (a copy of its folder). Never write into ``out``: copy it."""
    from tests.e2e import PLAIN_RUN, metrics, run_train, shm_left_after, shm_names

    out = tmp_path_factory.mktemp("plain_run") / "run"
    before = shm_names()
    proc = run_train(*assets, *PLAIN_RUN, f"trainer.output_dir={out}", timeout=900)
    left = shm_left_after(before)  # what no_shm_leak checks, for this run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not left, f"left behind in {SHM}: {left}"
    return {"out": out, "stdout": proc.stdout, "metrics": {r["step"]: r for r in metrics(out)}}


# -- CPU-seconds per test ------------------------------------------------------------------------
# On CI's 2 cores the suite is CPU-bound: its wall time is about its CPU seconds / 2, whatever the order
# or the niceness of the streams. Wall durations (--durations) mix a test's own work with its neighbours';
# this report says where the CPU goes: user+sys of this process and of the children reaped during the
# test (subprocesses, torchrun ranks, engines; a module fixture's processes count where they are reaped;
# processes that a forkserver or a detached daemon started are never reaped here: a lower bound). The warm
# torchrun pools serve many tests and end after the report: their CPU is added to the session's total.
_CPU: dict[str, list[float]] = {}


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.monotonic()
    yield
    _CPU[item.nodeid] = [_cpu_seconds() - cpu, time.monotonic() - wall]


def _live_descendants_cpu_seconds() -> tuple[int, float]:
    """Processes still running under this one (the warm torchrun pools, megatron_grpo.testing.torchrun_pool,
    serve many tests and are reaped only after the report) and what they used so far, their own reaped
    children included."""
    from tests.e2e import descendants

    tick, total, pids = os.sysconf("SC_CLK_TCK"), 0.0, descendants(os.getpid())
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    return len(pids), total


def pytest_terminal_summary(terminalreporter):
    if not _CPU:
        return
    total = sum(c for c, _ in _CPU.values())
    top = sorted(_CPU.items(), key=lambda kv: -kv[1][0])[:15]
    live, live_cpu = _live_descendants_cpu_seconds()
    terminalreporter.write_sep("=", f"CPU seconds: {total:.0f} in {len(_CPU)} tests (own + reaped children); "
                                    f"session so far {_cpu_seconds():.0f}, + {live_cpu:.0f} in {live} live "
                                    f"helper processes (warm pools); the 15 largest")
    for nodeid, (cpu, wall) in top:
        terminalreporter.write_line(f"{cpu:8.1f} CPU-s {wall:8.1f} s wall  {nodeid}")
