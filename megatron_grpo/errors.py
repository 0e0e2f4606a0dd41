"""How entry points report bad input: one `error: ...` line on stderr, exit code 2.

Input problems are ValueError-family exceptions (ConfigError, DatasetLoadError, WeightLoadError,
CheckpointError, ...) or OSErrors for missing paths; their message is the line the user sees.
"""
from __future__ import annotations

import os
import signal
import sys
import time

INPUT_ERRORS = (ValueError, OSError)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# How long a rank that leaves the report to rank 0 waits before it exits (see report)
RANK0_REPORT_GRACE_S = 30.0


def report(e: BaseException, *, every_rank: bool = False) -> int:
    """Print the error once (rank 0) or, for failures one rank may hit alone, on every rank.

    When rank 0 reports for all, the other ranks give it time to: torchrun (and srun with
    --kill-on-bad-exit) ends every rank at the first exit, so a rank leaving at once could kill rank 0
    before its line is out (seen: a failed step-1 parity check on 2 ranks ended with exit 2 and no line).
    They wait up to ``RANK0_REPORT_GRACE_S``; rank 0's exit ends the wait (the launcher stops them).
    """
    rank = os.environ.get("RANK", "0")
    if every_rank:
        print(f"error: [rank {rank}] {one_line(e)}", file=sys.stderr, flush=True)
    elif rank == "0":
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for sig in (signal.SIGTERM, signal.SIGINT):  # the launcher's stop ends the wait (no preemption handler)
            signal.signal(sig, signal.SIG_DFL)
        time.sleep(RANK0_REPORT_GRACE_S)
    return 2


def run_tool(args, preflight, run) -> int:
    """A conversion tool's main: checks that every rank makes alike (rank 0 reports), then the work."""
    try:
        pre = preflight(args)
    except INPUT_ERRORS as e:
        return report(e)
    try:
        run(args, pre)
    except INPUT_ERRORS as e:
        return report(e, every_rank=True)
    return 0
