"""The Streamer in tests, run as a gateway would meet it.

- ``Service``: a ``StreamerNode`` (the composition root ``streamer serve``
  runs) in-process on loopback, fed by a ``PullerDouble``, so events
  appended to the Puller reach gateways end to end. ``stop``/``start``
  restart the node on the same port with a fresh index and sessions; the
  Puller and the progress marker survive it.
- ``serving``: ``streamer serve`` as a real process against a fresh
  ``PullerDouble`` on a free loopback port, its output in a file, both
  stopped afterwards whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from puller_double import PullerDouble

from streamer.node.delivery import DEFAULT_CAPACITY
from streamer.node.events import Layout
from streamer.node.node import NodeConfig, StreamerNode
from streamer.node.server import StreamerServicer
from streamer.node.sessions import Session, Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc
from streamer.tools.measure import free_port


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a command that refuses to start prints on stderr (and
    nothing on stdout); asserts that it is one line and exit code 2."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


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


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Bounded wait for something that happens in the background."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class Service:
    """A ``StreamerNode`` in-process against a ``PullerDouble``, restartable:
    ``stop`` then ``start`` is a restart on the same port with a fresh
    index and sessions, as after a crash; the Puller and the state
    directory outlive it."""

    def __init__(
        self,
        state_dir: Path,
        *,
        session_ttl: float = 90.0,
        token: bytes | None = None,
        layout: Layout = "plain",
        queue_capacity: int = DEFAULT_CAPACITY,
        resume_grace: float = 0.0,
    ) -> None:
        # The Puller's address is filled in at start.
        self.config = NodeConfig(
            puller="", state_dir=state_dir, session_ttl=session_ttl, auth_token=token,
            document_layout=layout, gateway_queue=queue_capacity, resume_grace=resume_grace,
            drain_seconds=0, puller_backoff=(0.01, 0.05),
            # The double, like a Syntrix Puller, says nothing until an event
            # comes: a resuming client's marker is taken as accepted after
            # this (the reference Puller confirms at once).
            catchup_confirm_seconds=0.2,
        )
        self.puller = PullerDouble()
        self.port = 0
        self.node: StreamerNode

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sessions(self) -> Sessions:
        return self.node.sessions

    @property
    def subscriptions(self) -> SubscriptionSet:
        return self.node.subscriptions

    def holder(self, sub_id: str) -> Session | None:
        """The session holding a subscription."""
        owner = self.subscriptions.owner_of(sub_id)
        return None if owner is None else self.sessions.by_owner[owner]

    @property
    def servicer(self) -> StreamerServicer:
        return self.node.servicer

    async def start(self) -> None:
        """Start the Streamer (on the port of the last start, if any) and
        wait until its ingest follows the Puller."""
        if not self.puller.port:
            await self.puller.start()
        self.node = StreamerNode(dataclasses.replace(
            self.config, puller=f"127.0.0.1:{self.puller.port}", listen=("127.0.0.1", self.port),
        ))
        subscribed = len(self.puller.subscriptions)
        await self.node.start()
        self.port = self.node.port
        await until(lambda: len(self.puller.subscriptions) > subscribed)

    async def stop(self) -> None:
        """Stop the Streamer (not the Puller): every gateway stream breaks."""
        await self.node.stop()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        await self.puller.stop()


class ServeProcess:
    """``streamer serve`` as a real process that a test can kill (``kill -9``)
    or stop (SIGTERM) and start again on the same port with the same
    ``--state-dir``, against one ``PullerDouble`` that outlives every run.
    Each run's output goes to its own file (``log(run)``); ``async with``
    starts the first run and, whatever happened, kills what still runs and
    stops the Puller. Given a ``puller`` (shared by several nodes), the
    process uses it and leaves it to its owner."""

    def __init__(self, tmp_path: Path, *args: str, puller: PullerDouble | None = None) -> None:
        self.puller = puller or PullerDouble()
        self._owns_puller = puller is None
        self.state = tmp_path / "state"
        self.port = free_port()
        self.args = args
        self._dir = tmp_path
        self.runs: list[tuple[subprocess.Popen[bytes], Path]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.runs[-1][0]

    def log(self, run: int = -1) -> str:
        return self.runs[run][1].read_text()

    async def start(self) -> None:
        """Start a run (the Puller too, the first time)."""
        if not self.puller.port:
            await self.puller.start()
        output = self._dir / f"serve-{len(self.runs)}.log"
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                serve_command("--listen", self.address, "--puller",
                              f"127.0.0.1:{self.puller.port}", "--state-dir", str(self.state),
                              *self.args),
                stdout=sink, stderr=subprocess.STDOUT,
            )
        self.runs.append((proc, output))

    async def kill(self) -> None:
        """``kill -9`` the current run and reap it."""
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait, 10)

    async def terminate(self, timeout: float = 30) -> int:
        """SIGTERM the current run; its exit code."""
        self.proc.terminate()
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def __aenter__(self) -> ServeProcess:
        try:
            await self.start()
        except BaseException:
            if self._owns_puller:
                await self.puller.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for proc, _ in self.runs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        finally:
            if self._owns_puller:
                await self.puller.stop()


# ``streamer puller`` as a real process.

def puller_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", "puller", *args]


def start_puller(tmp_path: Path, port: int, *args: str, run: str = "0") -> subprocess.Popen[bytes]:
    output = tmp_path / f"puller-{run}.log"
    with output.open("wb") as sink:
        return subprocess.Popen(
            puller_command("--listen", f"127.0.0.1:{port}", "--log-dir", str(tmp_path / "log"),
                           *args),
            stdout=sink, stderr=subprocess.STDOUT,
        )


async def puller_events(
    port: int, after: str, count: int, timeout: float = 20
) -> list[pb.PullerEvent]:
    """``count`` change events (heartbeats skipped) after ``after``."""
    out: list[pb.PullerEvent] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.PullerServiceStub(channel)
                    async for batch in stub.SubscribeBatch(pb.SubscribeRequest(after=after)):
                        out.extend(e for e in batch.events if e.HasField("change_event"))
                        if len(out) >= count:
                            return out[:count]
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # not up yet
                    raise
                await asyncio.sleep(0.1)


def stop_puller(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(20)
