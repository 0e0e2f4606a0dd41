"""megatron_grpo/distributed/ports.py: rendezvous ports come from below the kernel's ephemeral range."""
import socket
from pathlib import Path

from megatron_grpo.distributed.ports import free_port


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn at random, not one fixed port for every caller
    for port in ports:
        assert max(1024, low - 8000) <= port < low, (port, low, high)  # never one the kernel hands out itself
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
