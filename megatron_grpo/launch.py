"""torchrun for `megatron-grpo train --nproc-per-node N` on one machine, without the launcher's traceback.

The ranks report their own failures (one ``error:`` line from rank 0, exit 2); torchrun's launcher
would then add a ``ChildFailedError`` traceback and a failure table, and exit 1. Here the launcher
exits with the failing rank's code, printing one ``error:`` line only for a rank that did not
report (killed by a signal, crashed): e.g. ``error: rank 1 exited with code -9 (SIGKILL)``.
"""
from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = int(failure.exitcode)
        if code == 2:  # the ranks' own one-line report (megatron_grpo.errors.report) is already out
            return 2
        what = f"code {code}"
        if code < 0:
            try:
                what += f" ({signal.Signals(-code).name})"
            except ValueError:
                pass
        print(f"error: rank {rank} exited with {what}; its output is above", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
