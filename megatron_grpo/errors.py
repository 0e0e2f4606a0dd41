"""How entry points report bad input: one `error: ...` line on stderr, exit code 2.

Input problems are ValueError-family exceptions (ConfigError, DatasetLoadError, WeightLoadError,
CheckpointError, ...) or OSErrors for missing paths; their message is the line the user sees.
"""
from __future__ import annotations

import os
import sys

INPUT_ERRORS = (ValueError, OSError)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def report(e: BaseException, *, every_rank: bool = False) -> int:
    """Print the error once (rank 0) or, for failures one rank may hit alone, on every rank."""
    rank = os.environ.get("RANK", "0")
    if every_rank:
        print(f"error: [rank {rank}] {one_line(e)}", file=sys.stderr, flush=True)
    elif rank == "0":
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
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
