"""Peak extra memory of a code region: the number the bridge promises to bound by the bucket size.

CUDA: the caching allocator's peak (``max_memory_allocated``) minus the allocation at entry.
CPU: torch has no allocator statistic for CPU tensors, so a thread samples glibc's live heap
bytes (``mallinfo2``: in-use arena bytes + in-use mmapped bytes; every CPU tensor is malloc'ed)
every ``interval_s``; peak minus entry. RSS is the fallback off glibc, but RSS hides reuse of
memory the allocator already holds, so it under-reports. Sampling can miss a spike shorter than
the interval: treat CPU numbers as estimates.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
        fn.restype = _MallInfo2
        return fn
    except (OSError, AttributeError):
        return None


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int:
    """Live malloc'ed bytes (glibc), else RSS."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return int(info.uordblks + info.hblkhd)
    return rss_bytes()


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory() as pm: ...``; then ``pm.peak_extra_bytes``."""

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.0005):
        dev = torch.device(device) if device is not None else None
        self.cuda = dev is not None and dev.type == "cuda"
        self.interval_s = interval_s
        self.peak_extra_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = self._peak = heap_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, heap_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_extra_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, heap_bytes())
            self.peak_extra_bytes = self._peak - self._base
        return False
