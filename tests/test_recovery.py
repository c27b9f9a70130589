"""Crashes and restarts with real processes (docs/delivery.md).

``streamer serve`` runs as a real subprocess (``service_helpers.ServeProcess``:
killable with ``kill -9``, restartable on the same port with the same
``--state-dir``) against a ``PullerDouble`` that outlives it, and gateways
are ``StreamerClient``s with short backoff. Events are appended continuously
in the background, also while the Streamer or the Puller is down.

Event ``k`` is ``e{k}`` with marker ``p{k}``, an insert of document ``d{k}``
into chat ``c{k % 3}``. Each gateway ``gw`` subscribes to two chats and to
the whole collection, and records for each subscription the event numbers it
receives, in order. Delivery is at-least-once: after a Streamer restart the
replay starts after the last *persisted* marker, so a subscription may see
events twice, but it must never miss one after that marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType

import orjson
from puller_double import PullerDouble
from service_helpers import ServeProcess, until

from streamer.client import StreamerClient
from streamer.node.events import Op
from streamer.node.progress import ProgressStore, SavedProgress
from streamer.protocol import puller_v1_pb2 as pb

CHATS = 3


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def event(k: int) -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{k}", database="app", mgo_coll="messages", mgo_doc_id=f"d{k}",
        op_type="insert", full_doc=orjson.dumps({"chat": f"c{k % CHATS}", "k": k}),
        timestamp=1_764_000_000_000 + k,
    )


def number(marker: str) -> int:
    assert marker.startswith("p"), marker
    return int(marker[1:])


class Producer:
    """Appends ``event(k)`` to the Puller every few milliseconds until stopped
    (the Puller keeps them while it, or the Streamer, is down)."""

    def __init__(self, puller: PullerDouble, period: float = 0.003) -> None:
        self.puller = puller
        self.period = period
        self._task: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return len(self.puller.events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.puller.append(event(self.count))
            await asyncio.sleep(self.period)

    async def more(self, n: int) -> None:
        """Wait until ``n`` more events have been appended."""
        target = self.count + n
        await until(lambda: self.count >= target, 30)

    async def stop(self) -> int:
        """Stop appending; how many events there are."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.count


class Fleet:
    """Gateways with three subscriptions each: ``{gw}/c{i}`` and
    ``{gw}/c{i+1}`` (``chat == c…``) and ``{gw}/all`` (the collection);
    ``received[sub]`` is the event numbers delivered to it, in order. The
    gateways in ``plain`` send no Hello and do not resume (``batch=False,
    resume=False``), as Syntrix gateways do; those in ``live_head`` say
    Hello but do not resume (``resume=False``); the others resume."""

    def __init__(
        self, address: str, ids: Iterable[str], plain: Iterable[str] = (),
        live_head: Iterable[str] = (),
    ) -> None:
        plain, live_head = set(plain), set(live_head)
        self.clients = {
            gw: StreamerClient(address, gateway_id=gw, batch=gw not in plain,
                               resume=gw not in plain | live_head, heartbeat_interval=0.2,
                               ack_timeout=2.0, backoff=(0.02, 0.1))
            for gw in ids
        }
        self.chat: dict[str, int | None] = {}  # subscription → its chat (None: all)
        self.received: dict[str, list[int]] = {}
        self.wrong: list[str] = []  # deliveries whose fields do not fit the event
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Fleet:
        for g, (gw, client) in enumerate(self.clients.items()):
            client.start()
            for chat in (g % CHATS, (g + 1) % CHATS, None):
                sub_id = f"{gw}/all" if chat is None else f"{gw}/c{chat}"
                filters = [] if chat is None else [("chat", "==", f"c{chat}")]
                await client.subscribe("messages", database="app", filters=filters,
                                       subscription_id=sub_id, timeout=30)
                self.chat[sub_id] = chat
                self.received[sub_id] = []
            self._tasks.append(asyncio.create_task(self._consume(gw, client)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self.clients.values():
            await client.close()

    async def _consume(self, gw: str, client: StreamerClient) -> None:
        async for delivery in client.deliveries():
            e = delivery.event
            k = int(e.event_id[1:])
            if (e.progress, e.document_id, e.operation, e.database, e.collection) != (
                f"p{k}", f"d{k}", Op.INSERT, "app", "messages"
            ) or orjson.loads(e.document_data) != {"chat": f"c{k % CHATS}", "k": k}:
                self.wrong.append(f"{gw}: {e}")
            for sub_id in delivery.subscription_ids:
                if not sub_id.startswith(f"{gw}/"):
                    self.wrong.append(f"{gw} got {sub_id}")
                self.received[sub_id].append(k)

    def expected(self, sub_id: str, count: int) -> list[int]:
        """The events 0..count-1 that subscription wants, in Puller order."""
        chat = self.chat[sub_id]
        return [k for k in range(count) if chat is None or k % CHATS == chat]

    async def caught_up(self, count: int, timeout: float = 20) -> None:
        """Wait (bounded) until every subscription got its last wanted event;
        on timeout, return anyway: the exact comparisons that follow say
        what is missing better than a timeout would."""
        def done() -> bool:
            return all(
                got and got[-1] == self.expected(sub_id, count)[-1]
                for sub_id, got in self.received.items()
            )
        with contextlib.suppress(TimeoutError):
            await until(done, timeout)

    def reconnected(self) -> bool:
        return all(c.reconnects >= 1 and c.connected for c in self.clients.values())


def ingest_streams(puller: PullerDouble) -> list[pb.SubscribeRequest]:
    """The live ingest's requests to the Puller (not the catch-up readers',
    whose consumer ids end in ``/catch-up-<n>``)."""
    return [s for s in puller.subscriptions if "/catch-up-" not in s.consumer_id]


def contiguous_runs(received: list[int], expected: list[int]) -> tuple[int, int]:
    """(a, b) with ``received == expected[:a] + expected[b:]``: one run per
    connection, each in order and without holes, the second to the end."""
    a = 0
    while a < min(len(received), len(expected)) and received[a] == expected[a]:
        a += 1
    rest = received[a:]
    b = len(expected) - len(rest)
    assert b >= 0 and rest == expected[b:], (received, expected)
    return a, b


async def saved_with(store: ProgressStore, ids: set[str], others: int) -> SavedProgress:
    """Wait until the progress file has a marker and names these gateways."""
    def ready() -> bool:
        saved = store.load()
        return bool(saved.marker) and saved.gateways.ids == ids and (
            saved.gateways.others == others)
    await until(ready, 30)
    return store.load()


async def kill_and_restart(serve: ServeProcess, producer: Producer) -> SavedProgress:
    """``kill -9`` mid-stream, events keep coming while the Streamer is down,
    then a restart; returns the progress saved at the kill."""
    await serve.kill()
    saved = ProgressStore(serve.state).load()
    await producer.more(100)
    await serve.start()
    return saved


def test_kill_9_then_restart_delivers_everything_after_the_saved_marker(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Gateways that say Hello but re-subscribe from the live head: the
        # restart window holds ingest until each has re-registered, so the
        # replay after the saved marker reaches them.
        async with ServeProcess(tmp_path, "--resume-grace", "60") as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)  # ingest follows
            ids = {"gw-0", "gw-1", "gw-2"}
            async with Fleet(serve.address, sorted(ids), live_head=ids) as fleet:
                producer = Producer(puller)
                producer.start()
                await saved_with(ProgressStore(serve.state), ids, 0)
                await producer.more(150)
                saved = await kill_and_restart(serve, producer)
                marker = number(saved.marker)
                assert saved.gateways.ids == ids and saved.gateways.others == 0
                # The replay waits for the gateways (the grace is a minute).
                await until(lambda: len(ingest_streams(puller)) >= 2, 30)
                assert ingest_streams(puller)[1].after == saved.marker
                await until(fleet.reconnected, 30)
                await producer.more(100)
                count = await producer.stop()
                assert marker < count - 200
                await fleet.caught_up(count)
                assert fleet.wrong == []
                for sub_id, got in fleet.received.items():
                    # First connection, then the replay after the saved
                    # marker: each run in order and whole, no gap after the
                    # marker (duplicates before it are allowed).
                    a, b = contiguous_runs(got, fleet.expected(sub_id, count))
                    assert b <= a or fleet.expected(sub_id, count)[b - 1] <= marker, sub_id
                assert all(c.reconnects == 1 for c in fleet.clients.values())
            assert serve.proc.poll() is None
            log = serve.log()
            assert "restart window: holding ingest up to 60 s for 3 gateway(s)" in log
            assert "restart window: every known gateway re-registered" in log
            assert f"resuming after {saved.marker!r}" in log

    run(scenario)


def test_kill_9_resuming_gateways_get_every_event_once_without_a_window(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        # Resuming gateways are not known to the restart window: ingest
        # resumes at once, and each subscription resumes after its own
        # marker, so nothing is lost and nothing comes twice.
        async with ServeProcess(tmp_path, "--resume-grace", "60") as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)
            ids = ["gw-0", "gw-1", "gw-2"]
            async with Fleet(serve.address, ids) as fleet:
                producer = Producer(puller)
                producer.start()
                await until(lambda: all(len(g) > 10 for g in fleet.received.values()), 30)
                await producer.more(150)
                saved = await kill_and_restart(serve, producer)
                assert saved.marker and saved.gateways.ids == frozenset()
                await until(lambda: len(ingest_streams(puller)) >= 2, 30)
                assert ingest_streams(puller)[1].after == saved.marker
                await until(fleet.reconnected, 30)
                await producer.more(100)
                count = await producer.stop()
                await fleet.caught_up(count)
                assert fleet.wrong == []
                for sub_id, got in fleet.received.items():
                    assert got == fleet.expected(sub_id, count), sub_id
                assert all(c.reconnects == 1 for c in fleet.clients.values())
            assert serve.proc.poll() is None
            log = serve.log()
            assert "holding ingest up to 60 s for 0 gateway(s) with Hello and 0 without" in log
            assert "restart window: every known gateway re-registered" in log

    run(scenario)


def test_a_puller_restart_mid_stream_leaves_no_gap(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ServeProcess(tmp_path) as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)
            async with Fleet(serve.address, ["gw-0"]) as fleet:
                producer = Producer(puller)
                producer.start()
                await until(lambda: len(fleet.received["gw-0/all"]) >= 100, 30)
                seen = len(fleet.received["gw-0/all"])
                await puller.stop()
                sent = producer.count  # nothing more leaves the stopped Puller
                await producer.more(100)  # kept for when it is back
                await puller.start_on(puller.port)
                await until(lambda: len(puller.subscriptions) >= 2, 30)
                resumed = number(puller.subscriptions[1].after)
                # After the last event the Streamer processed.
                assert seen - 1 <= resumed < sent
                await producer.more(100)
                count = await producer.stop()
                await fleet.caught_up(count)
                assert fleet.wrong == []
                # The Streamer stayed up: every event exactly once, in order.
                for sub_id, got in fleet.received.items():
                    assert got == fleet.expected(sub_id, count), sub_id
                assert fleet.clients["gw-0"].reconnects == 0
            assert serve.proc.poll() is None
            assert "puller stream failed" in serve.log()

    run(scenario)


# A gateway process: one resuming StreamerClient subscribed to the whole
# collection, writing each delivered event id to a file as it comes.
SLOW_GATEWAY = """
import asyncio, sys
from streamer.client import StreamerClient

async def main():
    async with StreamerClient(sys.argv[1], gateway_id="gw-slow", heartbeat_interval=0.2,
                              ack_timeout=3.0, backoff=(0.02, 0.1)) as client:
        await client.subscribe("messages", database="app", subscription_id="all", timeout=30)
        with open(sys.argv[2], "a", buffering=1) as out:
            out.write("ready\\n")
            async for delivery in client.deliveries():
                out.write(delivery.event.event_id + "\\n")

asyncio.run(main())
"""


def test_a_gateway_cut_off_for_not_reading_resumes_without_a_gap(tmp_path: Path) -> None:
    async def scenario() -> None:
        # The gateway process is stopped (SIGSTOP) while 64 KiB documents
        # flow: its writes block, the stall watchdog cuts it off. Continued,
        # it reconnects and resumes after its last delivery: every event,
        # once, in order.
        async with ServeProcess(tmp_path, "--stall-seconds", "0.5") as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)
            received = tmp_path / "received.txt"
            script = tmp_path / "gateway.py"
            script.write_text(SLOW_GATEWAY)
            gateway = subprocess.Popen([sys.executable, str(script), serve.address, str(received)])
            pad = "x" * (64 << 10)

            async def produce(first: int, last: int) -> None:
                for k in range(first, last):
                    e = event(k)
                    e.full_doc = orjson.dumps({"chat": f"c{k % CHATS}", "k": k, "pad": pad})
                    await puller.append(e)
                    await asyncio.sleep(0.002)

            def lines() -> list[str]:
                return received.read_text().split() if received.exists() else []

            try:
                await until(lambda: lines() == ["ready"], 30)
                await produce(0, 20)
                await until(lambda: lines()[-1:] == ["e19"], 30)
                os.kill(gateway.pid, signal.SIGSTOP)
                await produce(20, 400)  # 25 MiB for the stopped gateway
                await until(lambda: "not reading" in serve.log(), 30)
                os.kill(gateway.pid, signal.SIGCONT)
                await produce(400, 450)
                await until(lambda: lines()[-1:] == ["e449"], 30)
                assert lines() == ["ready"] + [f"e{k}" for k in range(450)]
            finally:
                gateway.kill()
                gateway.wait(10)
            log = serve.log()
            assert "RESOURCE_EXHAUSTED: gateway lagging: not reading" in log
            assert "handed over to live ingest" in log  # it resumed from the replay

    run(scenario, timeout=90)


def test_sigterm_while_events_flow_exits_0_with_the_marker_flushed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ServeProcess(tmp_path, "--drain-seconds", "1") as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)
            async with Fleet(serve.address, ["gw-0"]) as fleet:
                producer = Producer(puller)
                producer.start()
                await until(lambda: len(fleet.received["gw-0/all"]) >= 100, 30)
                assert await serve.terminate() == 0
                count = await producer.stop()
                saved = ProgressStore(serve.state).load()
                marker = number(saved.marker)
                assert marker < count - 1  # events were still coming
                # Everything enqueued before the stop was drained to the gateway.
                await fleet.caught_up(marker + 1)
                assert fleet.wrong == []
                for sub_id, got in fleet.received.items():
                    assert got == fleet.expected(sub_id, marker + 1), sub_id
                # The highest progress the gateway received is the saved marker.
                assert max(fleet.received["gw-0/all"]) == marker
            log = serve.log()
            assert serve.proc.returncode == 0
            assert f"stopped at marker {saved.marker!r}" in log

    run(scenario)


def test_the_restart_window_waits_for_plain_gateways_to_resubscribe(tmp_path: Path) -> None:
    async def scenario() -> None:
        # A plain gateway cannot prove it is back: the window waits until as
        # many plain gateways as before have re-subscribed and gone quiet,
        # then the replay after the saved marker reaches them too.
        async with ServeProcess(tmp_path, "--resume-grace", "60") as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)
            hello = {"gw-1"}  # says Hello, re-subscribes from the live head
            async with Fleet(serve.address, ["gw-0", "gw-1", "plain"], plain=["plain"],
                             live_head=hello) as fleet:
                producer = Producer(puller)
                producer.start()
                await saved_with(ProgressStore(serve.state), hello, 1)
                await producer.more(150)
                saved = await kill_and_restart(serve, producer)
                marker = number(saved.marker)
                assert (saved.gateways.ids, saved.gateways.others) == (frozenset(hello), 1)
                await until(lambda: len(ingest_streams(puller)) >= 2, 30)
                assert ingest_streams(puller)[1].after == saved.marker
                await until(fleet.reconnected, 30)
                await producer.more(100)
                count = await producer.stop()
                await fleet.caught_up(count)
                assert fleet.wrong == []
                for sub_id, got in fleet.received.items():
                    expected = fleet.expected(sub_id, count)
                    if not sub_id.startswith("gw-0/"):
                        # First connection, then the replay after the saved
                        # marker: each run in order and whole, no gap after
                        # the marker (duplicates before it are allowed).
                        a, b = contiguous_runs(got, expected)
                        assert b <= a or expected[b - 1] <= marker
                    else:
                        assert got == expected, sub_id  # resumed: every event, once
            log = serve.log()
            assert "for 1 gateway(s) with Hello and 1 without" in log
            assert "restart window: every known gateway re-registered" in log

    run(scenario)
