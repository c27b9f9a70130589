"""Running ``streamer serve`` as a real process in tests.

``serving`` starts a ``PullerDouble`` and ``streamer serve`` against it on a
free loopback port, with the process's output in a file, and stops both
afterwards whatever happened.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from puller_double import PullerDouble


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", "serve", *args]


@dataclass
class Serving:
    address: str  # HOST:PORT of the Streamer
    puller: PullerDouble
    proc: subprocess.Popen[bytes]
    output: Path  # the process's stdout and stderr

    def log(self) -> str:
        return self.output.read_text()


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *args: str, puller_credentials: grpc.ServerCredentials | None = None
) -> AsyncIterator[Serving]:
    """``streamer serve ARGS`` against a fresh ``PullerDouble`` (served with
    ``puller_credentials``, if given), its state in ``tmp_path/state``."""
    puller = PullerDouble(credentials=puller_credentials)
    target = await puller.start()
    port = free_port()
    output = tmp_path / "serve.log"
    try:
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                serve_command("--listen", f"127.0.0.1:{port}", "--puller", target,
                              "--state-dir", str(tmp_path / "state"), *args),
                stdout=sink, stderr=subprocess.STDOUT,
            )
        try:
            yield Serving(f"127.0.0.1:{port}", puller, proc, output)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        await puller.stop()
