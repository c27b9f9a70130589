"""Transport baseline: the CPU one gRPC stream message costs on this machine.

Every design choice about batching rests on this figure, so it is measured
here rather than assumed: a server process (pinned to CPU 1 when there are
two) streams ``MESSAGES`` serialized 100-byte messages to a client in this
process (CPU 0), once with grpc.aio (``context.write``, as the Streamer's
writers do) and once with the thread-based grpc server (a response
generator). The server reports the CPU it spent per message from
``getrusage``; the client only drains the stream.

``STREAMER_BENCH_TRANSPORT_MESSAGES`` (20000) sets the size.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

MESSAGES = int(os.environ.get("STREAMER_BENCH_TRANSPORT_MESSAGES", "20000"))
SERVICE = "bench.Transport"
PAYLOAD = b"\x0a" + b"x" * 99


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(kind: str, cpu: float, seconds: float) -> None:
    print(json.dumps({"kind": kind, "cpu_us_per_message": cpu / MESSAGES * 1e6,
                      "messages_per_s": MESSAGES / seconds}), flush=True)


async def _aio_server(port_file: Path) -> None:
    async def stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await requests.__anext__()
        cpu, start = _cpu(), time.perf_counter()
        for _ in range(MESSAGES):
            await context.write(PAYLOAD)
        _report("grpc.aio context.write", _cpu() - cpu, time.perf_counter() - start)

    server = grpc.aio.server()
    handlers = {"S": grpc.stream_stream_rpc_method_handler(stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port_file.write_text(str(server.add_insecure_port("127.0.0.1:0")))
    await server.start()
    await server.wait_for_termination()


def _sync_server(port_file: Path) -> None:
    def stream(requests: Any, context: grpc.ServicerContext) -> Any:
        next(requests)
        cpu, start = _cpu(), time.perf_counter()
        for _ in range(MESSAGES):
            yield PAYLOAD
        _report("grpc (threads) generator", _cpu() - cpu, time.perf_counter() - start)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handlers = {"S": grpc.stream_stream_rpc_method_handler(stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port_file.write_text(str(server.add_insecure_port("127.0.0.1:0")))
    server.start()
    server.wait_for_termination()


def _drain(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/{SERVICE}/S")(iter([b"go"]))
        for received, _ in enumerate(call, 1):
            if received == MESSAGES:
                return


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_cpu_per_stream_message(kind: str, tmp_path: Path, bench_report: list[str]) -> None:
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, __file__, kind, str(port_file)], stdout=subprocess.PIPE, text=True
    )
    own_cpus = os.sched_getaffinity(0)
    try:
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(server.pid, {1})
            os.sched_setaffinity(0, {0})
        for _ in range(300):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        _drain(int(port_file.read_text()))
        assert server.stdout is not None
        figures = json.loads(server.stdout.readline())
    finally:
        os.sched_setaffinity(0, own_cpus)
        server.kill()
        server.wait(10)
    bench_report.append(
        f"transport: {figures['kind']}: {figures['cpu_us_per_message']:.1f} µs of server CPU "
        f"per 100-byte stream message, {figures['messages_per_s']:,.0f} messages/s "
        f"({MESSAGES:,} messages)"
    )
    assert figures["cpu_us_per_message"] > 0


if __name__ == "__main__":
    if sys.argv[1] == "aio":
        asyncio.run(_aio_server(Path(sys.argv[2])))
    else:
        _sync_server(Path(sys.argv[2]))
