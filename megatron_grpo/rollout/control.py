"""The control channel between the trainer's driver rank and rollout servers on other nodes.

One TCP connection per rollout replica, carrying small pickled commands and results (prompts,
completions, bucket metadata); weight bytes never travel here, they go over the ``TransferGroup``.
Messages use ``multiprocessing.connection.Connection`` framing and its HMAC challenge: a peer
without the shared key is refused before anything is unpickled. The key is
``GRPO_TRANSFER_AUTHKEY`` when set (``slurm/grpo_disaggregated.sh`` draws a random one per job);
otherwise it is derived from the job id and the address, which only keeps stray connections
(another job, a port scan) out.

Both ends have deadlines: the trainer waits for all replicas, a server retries its connection
while the trainer starts up; each failure is one line naming ``addr:port``.
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

ADDR_ENV, PORT_ENV, AUTHKEY_ENV = "GRPO_TRANSFER_ADDR", "GRPO_TRANSFER_PORT", "GRPO_TRANSFER_AUTHKEY"


def transfer_address() -> tuple[str, int] | None:
    """``(GRPO_TRANSFER_ADDR, GRPO_TRANSFER_PORT)`` from the environment, or None when unset."""
    addr, port = os.environ.get(ADDR_ENV), os.environ.get(PORT_ENV)
    if not addr:
        return None
    if not port or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{ADDR_ENV}={addr} needs {PORT_ENV}=<port 1..65535>, got {PORT_ENV}={port!r}")
    return addr, int(port)


def authkey(addr: str, port: int) -> bytes:
    key = os.environ.get(AUTHKEY_ENV)
    if key:
        return key.encode()
    return hashlib.sha256(f"megatron-grpo/{os.environ.get('SLURM_JOB_ID', '')}/{addr}:{port}".encode()).digest()


def resolve(addr: str, port: int) -> None:
    """Fail at once on a host name that does not resolve (a typo must not cost the whole timeout)."""
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConnectionError(f"{ADDR_ENV}={addr}: cannot resolve the host name ({e.strerror})") from None


def listen(addr: str, port: int) -> socket.socket:
    resolve(addr, port)
    try:
        return socket.create_server((addr, port), reuse_port=False, backlog=64)
    except OSError as e:
        raise ConnectionError(f"cannot listen for rollout servers at {addr}:{port} ({e.strerror}): "
                              f"{ADDR_ENV} must name training rank 0's host and {PORT_ENV} a free port") from None


def accept(server: socket.socket, key: bytes, deadline: float, what: str) -> Connection:
    """One authenticated connection; ConnectionError naming the address when ``deadline`` passes."""
    addr, port = server.getsockname()[:2]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(f"no {what} connected to {addr}:{port} in time")
        server.settimeout(left)
        try:
            sock, _ = server.accept()
        except socket.timeout:
            continue
        try:
            return _authenticated(sock, key, first=deliver_challenge, second=answer_challenge)
        except Exception:  # wrong key, not our protocol, silent peer: drop it, keep waiting
            continue


def connect(addr: str, port: int, key: bytes, deadline: float, should_stop=lambda: False) -> Connection:
    """Connect, retrying while nothing listens yet (the trainer is still starting) until ``deadline``."""
    resolve(addr, port)
    last = "nothing answered"
    while not should_stop():
        try:
            sock = socket.create_connection((addr, port), timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        except OSError as e:
            last = e.strerror or type(e).__name__
            if time.monotonic() >= deadline:
                raise ConnectionError(f"rollout server: no trainer reachable at {addr}:{port} "
                                      f"({last}); is {ADDR_ENV}/{PORT_ENV} training rank 0's address?") from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        try:
            return _authenticated(sock, key, first=answer_challenge, second=deliver_challenge)
        except Exception as e:
            raise ConnectionError(f"rollout server: the listener at {addr}:{port} refused the handshake "
                                  f"({type(e).__name__}): a different job, or {AUTHKEY_ENV} differs") from None
    raise InterruptedError("stopped while connecting")


def _authenticated(sock: socket.socket, key: bytes, *, first, second, handshake_s: int = 30) -> Connection:
    """HMAC challenge both ways; reads time out during the handshake only (a silent peer must not
    block the trainer). Keepalive lets a connection to a vanished host fail eventually."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", handshake_s, 0))
    conn = Connection(os.dup(sock.fileno()))
    try:
        first(conn, key)
        second(conn, key)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    except BaseException:
        conn.close()
        raise
    finally:
        sock.close()
    return conn
