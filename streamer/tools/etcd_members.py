"""Real etcd for the tests and the chaos run (``streamer.tools.chaos``):
1 or 3 members as processes on free loopback ports (client and peer URLs on
127.0.0.1), each with a data directory and its own log, stopped by PID
afterwards whatever happened.

``etcd_cluster(tmp_path, size)`` starts them and waits until every member
is healthy; ``EtcdCluster.leader()`` finds the current leader (each
member's ``etcd_server_is_leader`` metric), ``kill_leader()`` SIGKILLs it,
and ``Member.start()`` restarts a member on its ports and data directory.
Members are stopped with SIGKILL: SIGTERM to all three members of a
cluster at once takes about 7 s, as each waits for the others.

``ETCD_MISSING`` is the one-line reason etcd tests are skipped when no
``etcd`` is on PATH (the ``etcd1``/``etcd3`` fixtures of tests/conftest.py).
A tool: off the service's import path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ETCD = shutil.which("etcd")
ETCD_MISSING = (
    None if ETCD else
    "etcd is not installed, so the etcd tests were skipped: install it with"
    " `apt-get install etcd-server` (Debian/Ubuntu) or put an etcd 3.4+ binary on PATH"
)


class Member:
    """One etcd member; ``endpoint`` is its client ``HOST:PORT``."""

    def __init__(self, name: str, directory: Path, initial_cluster: str, token: str,
                 client_port: int, peer_port: int) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = directory / f"{name}.etcd"
        self.log_path = directory / f"{name}.log"
        self.initial_cluster = initial_cluster
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart, on the same ports and data) the member; does
        not wait for it (``EtcdCluster.wait_healthy``)."""
        if ETCD is None:
            raise RuntimeError(ETCD_MISSING)
        if self.running:
            raise RuntimeError(f"etcd {self.name} is running already")
        client = f"http://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", self.initial_cluster,
                 "--initial-cluster-token", self.token, "--initial-cluster-state", "new",
                 "--logger", "zap", "--log-outputs", "stderr"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}{path}", timeout=1) as reply:
                return str(reply.read().decode())
        except (OSError, urllib.error.URLError):
            return None

    def healthy(self) -> bool:
        return self.running and '"health":"true"' in (self._get("/health") or "")

    def is_leader(self) -> bool:
        metrics = self._get("/metrics") or ""
        return self.running and "\netcd_server_is_leader 1\n" in metrics


class EtcdCluster:
    def __init__(self, members: list[Member]) -> None:
        self.members = members

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The members as ``--cluster`` and ``StreamerClient(cluster=...)`` take them."""
        return "etcd://" + ",".join(self.endpoints)

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log_path.read_text(errors='replace')[-3000:]}"
                         for m in self.members if m.log_path.exists())

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every running member answers /health with true."""
        deadline = time.monotonic() + timeout
        while not all(m.healthy() for m in self.members if m.running):
            for m in self.members:
                if m.proc is not None and not m.running:
                    raise RuntimeError(f"etcd {m.name} exited:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy in {timeout} s:\n{self.logs()}")
            time.sleep(0.05)

    def leader(self, timeout: float = 15) -> Member:
        """The running member that is leader now (waits for an election)."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = [m for m in self.members if m.running and m.is_leader()]
            if len(leaders) == 1:
                return leaders[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no single etcd leader in {timeout} s")
            time.sleep(0.05)

    def kill_leader(self) -> Member:
        leader = self.leader()
        leader.kill()
        return leader

    def stop(self) -> None:
        for m in self.members:
            m.kill()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on loopback now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@contextlib.contextmanager
def etcd_cluster(directory: Path, size: int = 1) -> Iterator[EtcdCluster]:
    """``size`` etcd members, healthy, under ``directory``; every one
    SIGKILLed at the end."""
    ports = list(zip(*[iter(free_ports(2 * size))] * 2, strict=True))
    initial = ",".join(f"etcd{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    directory.mkdir(parents=True, exist_ok=True)
    token = f"test-{os.getpid()}-{time.monotonic_ns()}"
    cluster = EtcdCluster([Member(f"etcd{i}", directory, initial, token, client, peer)
                           for i, (client, peer) in enumerate(ports)])
    try:
        for m in cluster.members:
            m.start()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()
