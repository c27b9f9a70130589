"""gRPC transport settings shared by the server and both of its clients,
and the loopback port helper of the tools that start local services.

Keepalive (docs/protocol.md, Keepalive): HTTP/2 pings every 30 s find a
peer that vanished without closing its connection (a crashed host, a dropped
NAT mapping) within 40 s, even on a stream that is otherwise silent. The server
accepts client pings down to every 10 s; gRPC's default enforcement (one per
5 minutes) would answer our clients' pings with GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

import socket

KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
)


def free_port() -> int:
    """A TCP port free on loopback now (for tools that start local services)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
