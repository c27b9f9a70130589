"""`streamer serve` as a real process: serves, delivers, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from puller_double import PullerDouble
from service_helpers import Serving, free_port, serving, until

from streamer.metrics import scrape
from streamer.progress import ProgressStore
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    Heartbeat,
    Hello,
    SubscribeRequest,
    Value,
)


def test_help_documents_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    for option in ("--listen", "--puller", "--state-dir", "--session-ttl", "--document-layout",
                   "--gateway-queue", "--resume-grace", "--consumer-id", "--drain-seconds",
                   "--auth-token-file", "--max-subscriptions", "--max-filters",
                   "--max-expression-length", "--metrics", "--tls-cert", "--tls-key",
                   "--tls-client-ca", "--puller-tls-ca", "--log-level", "--log-format",
                   "STREAMER_"):
        assert option in out
    assert "(default: None)" not in out


def test_bad_environment_value_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--puller", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "STREAMER_SESSION_TTL": "soon"},
    )
    assert result.returncode == 2
    assert "invalid float value: 'soon'" in result.stderr


def test_serve_delivers_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "--listen", f"127.0.0.1:{port}",
             "--puller", target, "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                checks = health_pb2_grpc.HealthStub(channel)
                for name in ("", "syntrix.streamer.v1.StreamerService"):
                    status = await checks.Check(health_pb2.HealthCheckRequest(service=name))
                    assert status.status == health_pb2.HealthCheckResponse.SERVING
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(GatewayMessage(subscribe=SubscribeRequest(
                    subscription_id="s", database="app", collection="messages",
                    filters=[Filter(field="chat", op="==", value=Value(string_value="c"))])))
                assert (await call.read()).subscribe_response.success
                for _ in range(1000):
                    if puller.subscriptions:
                        break
                    await asyncio.sleep(0.01)
                await puller.append(pb.ChangeEvent(
                    event_id="e0", database="app", mgo_coll="messages", mgo_doc_id="m0",
                    op_type="insert", full_doc=orjson.dumps({"chat": "c"})))
                delivery = (await asyncio.wait_for(call.read(), 30)).delivery
                assert (list(delivery.subscription_ids), delivery.event.progress) == (["s"], "p0")
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 30) == 0
            assert ProgressStore(tmp_path).load().marker == "p0"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            await puller.stop()

    asyncio.run(main())


def _saved(state: Path, marker: str, gateways: list[str], others: int) -> None:
    state.mkdir()
    (state / "progress.json").write_bytes(
        orjson.dumps({"marker": marker, "gateways": gateways, "others": others}))


def test_restart_window_ends_when_known_gateways_are_back(tmp_path: Path) -> None:
    """A saved marker and a known gateway: ingest waits for that gateway's
    Hello, subscriptions and Heartbeat, not for the (huge) grace."""
    _saved(tmp_path / "state", "p0", ["gw-1"], 0)

    async def main() -> None:
        async with serving(tmp_path, "--resume-grace", "600") as serve:
            puller = serve.puller
            await puller.append(*(pb.ChangeEvent(
                event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
                op_type="insert", full_doc=orjson.dumps({"chat": "c"})) for i in range(3)))
            async with grpc.aio.insecure_channel(serve.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(GatewayMessage(hello=Hello(gateway_id="gw-1")))
                await call.write(GatewayMessage(subscribe=SubscribeRequest(
                    subscription_id="s", database="app", collection="messages")))
                assert (await call.read()).subscribe_response.success
                await asyncio.sleep(0.2)
                assert not puller.subscriptions, "ingest started before the heartbeat"
                await call.write(GatewayMessage(heartbeat=Heartbeat(gateway_id="gw-1")))
                assert (await call.read()).HasField("heartbeat_ack")
                got = [(await asyncio.wait_for(call.read(), 30)).delivery.event.event_id
                       for _ in range(2)]
                # Everything after the saved marker, and nothing before it.
                assert got == ["e1", "e2"]
                assert puller.subscriptions[0].after == "p0"
                call.cancel()
            assert "every known gateway re-registered" in serve.log()

    asyncio.run(main())


def test_restart_window_waits_the_grace_for_gateways_without_hello(tmp_path: Path) -> None:
    _saved(tmp_path / "state", "p0", [], 1)

    async def main() -> None:
        async with serving(tmp_path, "--resume-grace", "0.5") as serve:
            for _ in range(3000):
                if serve.puller.subscriptions:
                    break
                await asyncio.sleep(0.01)
            assert serve.puller.subscriptions[0].after == "p0"
            assert "grace elapsed; not back: only gateways without Hello" in serve.log()

    asyncio.run(main())


def test_unreadable_progress_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_bytes(b"{not json")
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--puller", "127.0.0.1:1",
         "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "progress.json: not a progress file" in result.stderr


def test_gateway_limits_come_from_flags(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--max-subscriptions", "1", "--max-filters", "1") as serve:
            async with grpc.aio.insecure_channel(serve.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                call = sgrpc.StreamerServiceStub(channel).Stream()
                chat = Filter(field="chat", op="==", value=Value(string_value="c"))
                two = SubscribeRequest(subscription_id="s0", collection="m", filters=[chat, chat])
                await call.write(GatewayMessage(subscribe=two))
                refused = (await call.read()).subscribe_response
                assert (refused.code, refused.error) == (
                    "resource_exhausted", "2 filters; the limit is 1")
                for sub_id in ("s1", "s2"):
                    await call.write(GatewayMessage(subscribe=SubscribeRequest(
                        subscription_id=sub_id, collection="m", filters=[chat])))
                first, second = [(await call.read()).subscribe_response for _ in range(2)]
                assert first.success and second.code == "resource_exhausted"
                call.cancel()

    asyncio.run(main())


async def open_gateway(svc: Serving, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """A batching gateway ``gw-1`` holding subscription ``s`` (all of app.messages),
    once the Streamer follows the Puller."""
    await asyncio.wait_for(channel.channel_ready(), 30)
    call = sgrpc.StreamerServiceStub(channel).Stream()
    await call.write(GatewayMessage(hello=Hello(gateway_id="gw-1", batch_delivery=True)))
    await call.write(GatewayMessage(subscribe=SubscribeRequest(
        subscription_id="s", database="app", collection="messages")))
    assert (await call.read()).subscribe_response.success
    await until(lambda: bool(svc.puller.subscriptions), 30)
    return call


def insert(i: int, size: int = 10) -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
        op_type="insert", full_doc=orjson.dumps({"pad": "x" * size}))


def test_sigterm_ends_an_idle_gateways_stream_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--drain-seconds", "30") as svc, \
                grpc.aio.insecure_channel(svc.address) as channel:
            call = await open_gateway(svc, channel)
            await svc.puller.append(insert(0))
            batch = (await asyncio.wait_for(call.read(), 30)).batch
            assert [d.event.event_id for d in batch.deliveries] == ["e0"]
            started = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 60)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # "server going away"
            assert ended.value.details() == "the Streamer is shutting down"
            assert await asyncio.to_thread(svc.proc.wait, 60) == 0
            # --drain-seconds is 30: nothing was left to drain, so no waiting.
            assert time.monotonic() - started < 10
        log = svc.log()
        assert re.search(r"INFO streamer\.server: gateway stream 1 opened by "
                         r"ipv4:127\.0\.0\.1:\d+\n", log), log
        assert re.search(r"INFO streamer\.server: gateway stream 1 ended \(gw-1 at "
                         r"ipv4:127\.0\.0\.1:\d+, batching\): UNAVAILABLE: the Streamer is "
                         r"shutting down; 1 subscription\(s\) dropped\n", log), log
        assert "Traceback" not in log

    asyncio.run(main())


def test_a_gateway_leaving_during_shutdown_ends_quietly(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--drain-seconds", "30") as svc, \
                grpc.aio.insecure_channel(svc.address) as channel:
            call = await open_gateway(svc, channel)
            svc.proc.send_signal(signal.SIGTERM)
            await until(lambda: "stopping:" in svc.log(), 30)
            await asyncio.sleep(1.0)  # into the drain
            call.cancel()
            assert await asyncio.to_thread(svc.proc.wait, 60) == 0
        log = svc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        assert "gateway stream 1 ended (gw-1 at ipv4:127.0.0.1:" in log

    asyncio.run(main())


@pytest.mark.parametrize("gateway_leaves", [True, False], ids=["gateway-leaves", "drain-ends"])
def test_a_gateway_still_being_written_holds_the_drain_and_ends_quietly(
    tmp_path: Path, gateway_leaves: bool
) -> None:
    """A gateway that reads nothing keeps its writer busy: it holds the
    drain until it goes away (then at once) or --drain-seconds runs out."""
    metrics = f"127.0.0.1:{free_port()}"
    drain = "30" if gateway_leaves else "1"

    def queued() -> float:
        try:
            samples = scrape(metrics, timeout=5)
        except OSError:
            return 0
        return sum(samples.get("streamer_gateway_queued_messages", {}).values())

    async def main() -> None:
        async with serving(tmp_path, "--drain-seconds", drain, "--metrics", metrics) as svc, \
                grpc.aio.insecure_channel(svc.address) as channel:
            call = await open_gateway(svc, channel)
            # 40 MB for a gateway that reads nothing: the transport fills up
            # and the rest waits in its queue.
            await svc.puller.append(*(insert(i, 10_000) for i in range(4000)))
            for _ in range(300):
                if await asyncio.to_thread(queued) > 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("nothing stayed queued for the gateway")
            started = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            if gateway_leaves:
                await until(lambda: "stopping:" in svc.log(), 30)
                await asyncio.sleep(1.0)  # into the drain
                call.cancel()
            assert await asyncio.to_thread(svc.proc.wait, 60) == 0
            assert time.monotonic() - started < 15  # not the 30 s of --drain-seconds
            call.cancel()
        log = svc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        [end] = re.findall(r".* gateway stream 1 ended .*", log)
        assert re.fullmatch(
            r".* WARNING streamer\.server: gateway stream 1 ended \(gw-1 at "
            r"ipv4:127\.0\.0\.1:\d+, batching\): cancelled during the shutdown drain \(the "
            r"gateway went away or --drain-seconds ran out\); 1 subscription\(s\) dropped, "
            r"[1-9]\d* queued message\(s\) unsent", end), end
        assert log.index(end) < log.index("stopped at marker")

    asyncio.run(main())
