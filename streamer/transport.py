"""gRPC transport settings shared by the server and both of its clients,
and binding a server to its address.

Keepalive (docs/protocol.md, Keepalive): HTTP/2 pings every 30 s find a
peer that vanished without closing its connection (a crashed host, a dropped
NAT mapping) within 40 s, even on a stream that is otherwise silent. The server
accepts client pings down to every 10 s; gRPC's default enforcement (one per
5 minutes) would answer our clients' pings with GOAWAY ``too_many_pings``.

Binding: gRPC sets ``SO_REUSEPORT`` by default, so a second server on a
port already served by the first "succeeds" and the kernel splits the
connections between the two at random; for a name with several addresses
(``localhost``) it also settles for binding only some of them. Our servers
turn ``SO_REUSEPORT`` off and ``bind`` first binds every resolved address
itself, so a held port, an unknown host or an address that is not this
host's fails at start with the reason (``ListenError``).
"""

from __future__ import annotations

import errno
import socket

import grpc

from streamer.errors import StreamerError
from streamer.options import join

KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
)


class ListenError(StreamerError, OSError):
    """A server cannot listen on its address; the message says why."""


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Add ``host:port`` to ``server`` (TLS with ``credentials``) and return
    the port bound (the one chosen when ``port`` is 0)."""
    where = join(host, port)
    try:
        resolved = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {where}: unknown host ({exc.strerror})") from None
    unusable = []
    for family, kind, proto, _, sockaddr in resolved:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port whose last connections are in TIME_WAIT
            # is free to serve again.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                unusable.append(exc)
    # A name may resolve to an address family this host lacks (::1 without
    # IPv6): gRPC serves the others. Anything else is fatal.
    fatal = [e for e in unusable if e.errno != errno.EADDRNOTAVAIL]
    if fatal or len(unusable) == len(resolved):
        first = (fatal or unusable)[0]
        reason = {
            errno.EADDRINUSE: "the port is in use by another process",
            errno.EADDRNOTAVAIL: "not an address of this host",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }.get(first.errno or 0, first.strerror or str(first))
        raise ListenError(f"cannot listen on {where}: {reason}")
    try:
        bound: int = (
            server.add_insecure_port(where) if credentials is None
            else server.add_secure_port(where, credentials)
        )
    except RuntimeError:
        bound = 0  # another process took the port since the probe
    if bound == 0:
        raise ListenError(f"cannot listen on {where}")
    return bound
