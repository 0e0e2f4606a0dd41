"""run_distributed's warm pool keeps the fresh launch's contract: per-rank results, a failed rank's
traceback, a hang killed and named, the caller's environment seen by the body, no state carried from
one body into the next, and a pool that failed or hung is replaced by a new one."""
import os

import pytest

from megatron_grpo.testing.torchrun import run_distributed

BODIES = "tests.dist.pool_bodies"


def _ok(**kw):
    return run_distributed(f"{BODIES}:allreduce", 2, warm=True, kwargs=kw, timeout=120)


def test_pool_reuses_ranks_and_reports_failures_and_hangs(monkeypatch):
    monkeypatch.setenv("POOL_TEST_MARKER", "first")
    first = _ok()
    assert [r["sum"] for r in first] == [3.0, 3.0] and [r["marker"] for r in first] == ["first", "first"]
    monkeypatch.setenv("POOL_TEST_MARKER", "second")
    second = _ok()
    assert [r["pid"] for r in second] == [r["pid"] for r in first], "the second body ran on the same ranks"
    assert [r["marker"] for r in second] == ["second", "second"], "each body sees its caller's environment"
    assert [r["draw"] for r in second] == [r["draw"] for r in first], "each body starts from the same RNG seed"

    with pytest.raises(AssertionError) as err:
        _ok(fail_rank=1)
    msg = str(err.value)
    assert "--- rank 1 failed" in msg and "body failed on rank 1 on purpose" in msg, msg
    after_failure = _ok()
    assert {r["pid"] for r in after_failure}.isdisjoint(r["pid"] for r in first), "a failed pool is replaced"

    with pytest.raises(AssertionError) as err:
        run_distributed(f"{BODIES}:allreduce", 2, warm=True, kwargs={"hang_rank": 0}, timeout=20)
    assert "hung: killed after 20s" in str(err.value) and "ranks without a result: [0, 1]" in str(err.value)
    after_hang = _ok()
    assert {r["pid"] for r in after_hang}.isdisjoint(r["pid"] for r in after_failure), "a hung pool is replaced"
    assert [r["sum"] for r in after_hang] == [3.0, 3.0]


def test_pool_cleans_state_between_bodies():
    left = run_distributed(f"{BODIES}:leave_state_behind", 2, warm=True, timeout=120)
    clean = run_distributed(f"{BODIES}:clean_state", 2, warm=True, timeout=120)
    assert [r["pid"] for r in clean] == [r["pid"] for r in left]
    for r in clean:
        assert not r["initialized"] and r["dtype"] == "torch.float32", r
        assert r["cwd"] == os.getcwd() and r["leftover"] is None, r
