"""`megatron-grpo train --nproc-per-node N` on one machine: two processes, one module.

1. The parent (``run_forwarding_signals``, stdlib only: no torch import) runs torchrun in a session of
   its own and hands the job's signals to the ranks. Slurm's scancel/preemption, `timeout` and Ctrl-C
   signal a whole process group. Left in that group, torchrun would take SIGTERM/SIGINT itself (its
   handler kills the ranks after a grace period and ends in a SignalException traceback) and SIGUSR1
   would kill it outright, while the parent died of the default action and returned to the shell with
   the job still running. Instead torchrun's session misses group signals, the parent catches
   SIGTERM/SIGINT/SIGUSR1 and forwards each once to the rank processes, which checkpoint the current
   step and exit 0; torchrun then sees clean exits, and the parent returns its exit code.
2. torchrun itself (``python -m megatron_grpo.launch``, ``main``), without the launcher's traceback.
   The ranks report their own failures (one ``error:`` line from rank 0, exit 2); torchrun's launcher
   would then add a ``ChildFailedError`` traceback and a failure table, and exit 1. Here the launcher
   exits with the failing rank's code, printing one ``error:`` line only for a rank that did not
   report (killed by a signal, crashed): e.g. ``error: rank 1 exited with code -9 (SIGKILL)``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

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


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    own_log_dir = None
    if getattr(args, "log_dir", None) is None and getattr(args, "logs_specs", None) is None:
        # torchrun's default is a tempfile.mkdtemp("torchelastic_") tree that nobody removes: one per run
        # left in /tmp. Ours goes when torchrun is done (the ranks' error files are read by then).
        import tempfile

        own_log_dir = args.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
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
    finally:
        if own_log_dir is not None:
            import shutil

            shutil.rmtree(own_log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":  # torchrun itself (imports torch): no interpreter teardown either
    from megatron_grpo.lifetime import exit_without_teardown

    exit_without_teardown(main())
