"""The node's bounds end to end, with real processes: a reference Puller
(``streamer puller --replay``) holding the largest events a change stream
produces, ``streamer serve``, and gateways (``StreamerClient``s)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import grpc
import orjson
import pytest
from service_helpers import puller_command, serve_command, start_puller, stop_puller

from streamer.client import StreamerClient
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol.streamer_v1_pb2 import EventDelivery, GatewayMessage, SubscribeRequest
from streamer.protocol.streamer_v1_pb2_grpc import StreamerServiceStub
from streamer.puller.log import ReplayLog
from streamer.puller.sources import to_json_line
from streamer.tools.measure import free_port, rss_mib

BIG = 5 << 20  # past gRPC's default 4 MiB receive limit


def change(k: int, text: str) -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{k}", database="app", mgo_coll="messages", mgo_doc_id=f"d{k}",
        op_type="insert", full_doc=orjson.dumps({"chat": "c", "k": k, "text": text}),
        timestamp=1_764_000_000_000 + k,
    )


async def take(client: StreamerClient, n: int) -> list[EventDelivery]:
    got: list[EventDelivery] = []
    async for delivery in client.deliveries():
        got.append(delivery)
        if len(got) == n:
            break
    return got


def test_the_largest_events_and_a_big_catch_up_reach_every_gateway(tmp_path: Path) -> None:
    """A catch-up of 256 events of 18 KB (one Puller batch of 4.6 MB), then
    a 5 MB document, then a small event: batching gateways get them whole,
    a plain gateway (4 MiB limit) gets the large one without its document;
    ingest never stalls."""
    events = [change(k, "x" * 18_000) for k in range(256)]
    events += [change(256, "y" * BIG), change(257, "small")]
    replay = tmp_path / "events.jsonl"
    replay.write_bytes(b"".join(to_json_line(e) for e in events))
    puller_port, port = free_port(), free_port()
    puller = start_puller(tmp_path, puller_port, "--replay", str(replay))
    log_id = tmp_path / "log" / "LOG_ID"
    for _ in range(200):
        if log_id.exists():
            break
        time.sleep(0.05)
    # Ingest starts at the log's beginning once both gateways are back: the
    # whole log is one catch-up.
    state = tmp_path / "state"
    state.mkdir()
    (state / "progress.json").write_bytes(orjson.dumps({
        "marker": f"v1:{log_id.read_text().strip()}:0", "gateways": ["gw-batch"], "others": 1,
    }))
    with (tmp_path / "serve.log").open("wb") as sink:
        serve = subprocess.Popen(
            serve_command("--listen", f"127.0.0.1:{port}", "--puller", f"127.0.0.1:{puller_port}",
                          "--state-dir", str(state), "--resume-grace", "5"),
            stdout=sink, stderr=subprocess.STDOUT,
        )

    async def main() -> None:
        target = f"127.0.0.1:{port}"
        async with StreamerClient(target, gateway_id="gw-batch", connect_timeout=30) as batch, \
                StreamerClient(target, gateway_id="gw-plain", batch=False,
                               connect_timeout=30) as plain:
            for client in (batch, plain):
                await client.subscribe("messages", database="app", filters=[("chat", "==", "c")])
            got_batch, got_plain = await asyncio.gather(take(batch, 258), take(plain, 258))
        assert [d.event.event_id for d in got_batch] == [f"e{k}" for k in range(258)]
        assert [d.event.event_id for d in got_plain] == [f"e{k}" for k in range(258)]
        big_batch, big_plain = got_batch[256].event, got_plain[256].event
        assert len(big_batch.document_data) > BIG and not big_batch.document_omitted
        assert big_plain.document_data == b"" and big_plain.document_omitted
        assert got_plain[255].event.document_data == events[255].full_doc

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        serve.terminate()
        assert serve.wait(30) == 0
        assert stop_puller(puller) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "delivered without its document" in log
    assert "puller stream failed" not in log, log


def test_the_puller_refuses_to_log_an_event_no_consumer_could_receive(tmp_path: Path) -> None:
    too_big = change(0, "z" * (49 << 20))  # past MAX_EVENT_BYTES
    replay = tmp_path / "events.jsonl"
    replay.write_bytes(to_json_line(too_big) + to_json_line(change(1, "fine")))
    result = subprocess.run(
        ["timeout", "-s", "TERM", "15", *puller_command(
            "--replay", str(replay), "--listen", f"127.0.0.1:{free_port()}",
            "--log-dir", str(tmp_path / "log"))],
        capture_output=True, text=True,
    )
    assert "event e0 of app.messages is" in result.stderr and "not logged" in result.stderr
    replay_log = ReplayLog(tmp_path / "log")
    try:
        assert [r.event.event_id for r in replay_log.read(0, 10)] == ["e1"]
    finally:
        replay_log.close()


def test_a_gateway_that_never_reads_is_cut_off_and_its_memory_freed(tmp_path: Path) -> None:
    """A gateway subscribes to everything and then reads nothing while 50 KB
    documents flow: it is cut off (RESOURCE_EXHAUSTED) once its queue holds
    --gateway-queue-bytes, the Streamer's memory stays bounded, and an
    honest gateway gets every event."""
    puller_port, port = free_port(), free_port()
    big = [change(k, "w" * 50_000) for k in range(2000)]
    replay = tmp_path / "events.jsonl"
    replay.write_bytes(b"".join(to_json_line(e) for e in big))
    puller = start_puller(tmp_path, puller_port, "--replay", str(replay), "--rate", "400")
    log_id = tmp_path / "log" / "LOG_ID"
    for _ in range(200):
        if log_id.exists():
            break
        time.sleep(0.05)
    # From the log's first event, once the honest gateway is registered.
    state = tmp_path / "state"
    state.mkdir()
    (state / "progress.json").write_bytes(orjson.dumps({
        "marker": f"v1:{log_id.read_text().strip()}:0", "gateways": ["honest"], "others": 0,
    }))
    with (tmp_path / "serve.log").open("wb") as sink:
        serve = subprocess.Popen(
            serve_command("--listen", f"127.0.0.1:{port}", "--puller", f"127.0.0.1:{puller_port}",
                          "--state-dir", str(state), "--resume-grace", "60",
                          "--gateway-queue-bytes", str(16 << 20)),
            stdout=sink, stderr=subprocess.STDOUT,
        )

    async def main() -> None:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stuck = StreamerServiceStub(channel).Stream()
            await stuck.write(GatewayMessage(subscribe=SubscribeRequest(
                subscription_id="greedy", database="app", collection="messages")))
            assert (await stuck.read()).subscribe_response.success
            async with StreamerClient(target, gateway_id="honest", connect_timeout=30) as honest:
                await honest.subscribe("messages", database="app",
                                       filters=[("chat", "==", "c")])
                got = await take(honest, 2000)
            assert [d.event.event_id for d in got] == [f"e{k}" for k in range(2000)]
            assert rss_mib(serve.pid) < 200  # 16 MiB of queue at most, not the whole flow
            # The stuck gateway sees the status after what it had been sent.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while await stuck.read() is not grpc.aio.EOF:
                    pass
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        serve.terminate()
        assert serve.wait(30) == 0
        assert stop_puller(puller) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "RESOURCE_EXHAUSTED: gateway lagging" in log, log
