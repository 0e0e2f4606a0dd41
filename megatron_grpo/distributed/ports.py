"""A free TCP port for a rendezvous (torchrun's master port, a transfer group's store).

Taken below the kernel's ephemeral range when it can be: a port found free there stays free until
someone binds it on purpose, whereas an ephemeral port (``bind(port 0)``) can be handed to any
process's outgoing connection before the store listens on it -- seen as torchrun's EADDRINUSE on the
master port while a dozen vLLM processes started beside it.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    try:
        low = int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 2048:
        for port in random.SystemRandom().sample(range(max(1024, low - 8000), low), 64):
            if _bindable(host, port):
                return port
    with socket.socket() as s:  # no range known, or nothing free below it
        s.bind((host, 0))
        return s.getsockname()[1]
