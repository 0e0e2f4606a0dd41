"""Entry point of one rank launched by :func:`megatron_grpo.testing.torchrun.run_distributed`.

Usage: ``python -m megatron_grpo.testing.torchrun_worker module:function RUN_DIR``, or ``--pool POOL_DIR``
to serve successive bodies (see :mod:`megatron_grpo.testing.torchrun_pool`).
Writes ``RUN_DIR/rank<R>.json``: ``{"ok": true, "result": ...}`` or ``{"ok": false, "traceback": ...}``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path


def run_one(target: str, run_dir: Path) -> bool:
    """Call ``target`` with ``run_dir/kwargs.json``; write this rank's record; True on success."""
    rank = int(os.environ.get("RANK", "0"))
    out = run_dir / f"rank{rank}.json"
    try:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        kwargs = json.loads((run_dir / "kwargs.json").read_text())
        result = func(**kwargs)
        record = {"ok": True, "result": result}
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit/KeyboardInterrupt
        record = {"ok": False, "traceback": traceback.format_exc()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=repr))
    tmp.rename(out)
    sys.stdout.flush()
    sys.stderr.flush()
    return record["ok"]


def main() -> int:
    if sys.argv[1] == "--pool":  # a warm pool (megatron_grpo.testing.torchrun_pool): many bodies, one launch
        from megatron_grpo.testing.torchrun_pool import serve

        code = serve(Path(sys.argv[2]), run_one)
    else:
        code = 0 if run_one(sys.argv[1], Path(sys.argv[2])) else 1
    if code == 0:
        # Skip interpreter teardown: vLLM/gloo background threads can hang at exit after success.
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    _end_children()
    os._exit(code)


def _end_children(timeout_s: float = 5.0) -> None:
    """End this rank's multiprocessing children (e.g. dist_checkpointing's results-queue manager):
    ``os._exit`` skips the finalizers that would, and they would run on as orphans."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout_s)
        if child.is_alive():
            child.kill()


if __name__ == "__main__":
    sys.exit(main())
