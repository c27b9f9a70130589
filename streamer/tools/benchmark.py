"""The end-to-end benchmark (``streamer bench e2e``, ``bench/bench_e2e.py``).

Puller, Streamer and gateways run as separate processes on loopback:

- ``streamer puller --workload chat --rate R --stamp-event-ids`` (a fresh
  replay log on tmpfs per rate, so the fsync of each batch costs nothing and
  the figures are the Streamer's, not the disk's). ``--stamp-event-ids``
  puts the emit time, in nanoseconds, into every event id
  (``ev-<n>-<ns>``): event ids are opaque to the Streamer and forwarded to
  gateways, so latency is measured without touching the protocol or the
  documents that matching reads.
- ``streamer serve --metrics`` pinned to CPU 1; everything else on CPU 0.
- G gateways (``StreamerClient``s, each its own stream and gateway id)
  holding their shares of N subscriptions of ``Workload(N, seed=1,
  gateways=G)``, hosted ``clients_per_process`` (4) per process
  (``python -m streamer.tools.benchmark gateway``). Each records deliveries in its
  stream reader and, for every 4th, ``time.time_ns() - stamp`` (one host,
  one clock) in a log-linear histogram (16 sub-buckets per power of two:
  within 6 %), and the number of the last event it received.
- A probe in this process follows the Puller with a ``Subscribe`` whose
  collection filter matches nothing, so it only gets heartbeats (every
  0.1 s) carrying the Puller's head position: what was really offered.

Per offered rate: a warm-up, then a measured window. "Sustained" means the
events reaching the gateways over the window kept up with what the Puller
produced (>= 97 %) and the backlog at the end of the window is below a
quarter of a second's worth. The relay baseline (``python -m
streamer.tools.benchmark relay``) replaces the Streamer with a pass-through that
consumes the Puller the same way and forwards every event, framed by the
same code (``streamer.node.delivery``), to each of the same number of
gateway clients in the same gateway processes, without decoding or
matching: the floor includes what the Streamer's gateways pay to receive
(about as many deliveries per second, on the shared load-generator core).

This lives in the package (not in ``bench/``) so that ``streamer bench e2e``
works from an installed wheel; it needs nothing beyond the service's own
dependencies and Linux's ``/proc`` for CPU and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from streamer.options import MAX_RATE, ArgumentParser, address, integer, one_of, real
from streamer.tools.measure import (
    Samples,
    cpu_seconds,
    free_port,
    gc_seconds,
    histogram_quantile,
    latency_buckets,
    longest_pause,
    quantile,
    rss_mib,
    scrape,
)

__all__ = ["Config", "main", "render", "run"]

SUB_BUCKETS = 16  # per power of two
IN_FLIGHT = 256  # subscribe requests in flight per gateway while registering
SUSTAINED_SHARE = 0.97
PROBE_HEARTBEAT = 0.1
SAMPLE_EVERY = 4  # gateways time every 4th delivery
MAX_PROBES = 3  # runs of the search for the maximum sustainable rate
CYCLE = 20_000  # events the Puller generates once and repeats (--cycle)


# ------------------------------------------------------------------ histogram
def bucket(value_ns: int) -> int:
    """Log-linear bucket of a positive latency: ~6 % wide."""
    if value_ns < SUB_BUCKETS:
        return max(value_ns, 0)
    b = value_ns.bit_length()
    return (b << 4) | ((value_ns >> (b - 5)) & 15)


def bucket_value(index: int) -> float:
    """Middle of a bucket, in ns."""
    if index < SUB_BUCKETS:
        return float(index)
    b, sub = index >> 4, index & 15
    low = (16 + sub) << (b - 5)
    return low + (1 << (b - 5)) / 2


def bucket_quantile(hist: dict[int, int], q: float) -> float:
    """The ``q`` quantile (ns) of a histogram, or NaN when it is empty."""
    return quantile({bucket_value(i): n for i, n in hist.items()}, q)


# ------------------------------------------------------------------- gateway
def window_of(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> tuple[int, int, dict[int, int]]:
    """From the gateway processes' ``report``s at the start of a window
    (after which they were ``reset``) and at its end: the first event index
    of the window, the first after it, and the latency histogram of the
    window merged over every gateway."""
    seen0 = max(r["last_index"] for r in before) + 1
    seen1 = max(r["last_index"] for r in after) + 1
    hist: dict[int, int] = {}
    for report in after:
        for k, v in report["hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
    return seen0, seen1, hist


async def _gateway(args: argparse.Namespace) -> None:
    """One gateway process hosting the ``StreamerClient`` of each index."""
    from streamer.client import StreamerClient, Subscription
    from streamer.tools.workload import Workload

    indexes = [int(x) for x in args.index.split(",")]
    state: dict[str, Any] = {"deliveries": 0, "hist": {}, "seen": 0}
    last = [-1] * len(indexes)
    every = args.sample_every

    def recorded(deliveries: Any, slot: int) -> None:
        """Count deliveries, time every ``every``-th (their position in the
        stream, not their content, picks them) and keep the slot's progress."""
        count = len(deliveries)
        seen = state["seen"]
        first = -seen % every
        state["seen"] = seen + count
        state["deliveries"] += count
        hist = state["hist"]
        now = time.time_ns()
        for i in range(first, count, every):
            b = bucket(now - int(deliveries[i].event.event_id.rsplit("-", 1)[1]))
            hist[b] = hist.get(b, 0) + 1
        # Deliveries arrive in Puller order: the last event number is this
        # gateway's progress (from 0 again with a new log). In a cluster a
        # re-homed subscription's catch-up brings older ones: the highest.
        number = int(deliveries[count - 1].event.event_id.split("-")[1])
        if not args.cluster or number > last[slot]:
            last[slot] = number

    class Gateway(StreamerClient):
        """A ``StreamerClient`` whose reader records deliveries where they
        arrive instead of queueing each one for a consumer: the load
        generator shares one core, and per-delivery Python would make it
        the bottleneck."""

        slot = 0

        async def _read(
            self, call: grpc.aio.StreamStreamCall[Any, Any], opened: asyncio.Event
        ) -> None:
            async for message in call:
                opened.set()
                kind = message.WhichOneof("payload")
                if kind == "batch":
                    recorded(message.batch.deliveries, self.slot)
                elif kind == "delivery":
                    recorded((message.delivery,), self.slot)
                else:
                    self._control(message, kind)
            raise ConnectionError("the server ended the stream")

    # --cluster: each gateway is a cluster client (StreamerClient(cluster=...));
    # its stream to each node is a _NodeClient, whose reader records the same
    # way after keeping the markers re-homing resumes from (_delivered), and
    # leaves out what it drops (deliveries for subscriptions moved away).
    from streamer.cluster import client as cluster_client

    class Link(cluster_client._NodeClient):
        async def _read(
            self, call: grpc.aio.StreamStreamCall[Any, Any], opened: asyncio.Event
        ) -> None:
            slot = getattr(self._cluster, "slot", 0)
            async for message in call:
                opened.set()
                kind = message.WhichOneof("payload")
                if kind == "batch" or kind == "delivery":
                    deliveries = (message.batch.deliveries if kind == "batch"
                                  else (message.delivery,))
                    self._delivered(deliveries)
                    kept = [d for d in deliveries if d.subscription_ids]
                    if kept:
                        recorded(kept, slot)
                else:
                    self._control(message, kind)
            raise ConnectionError("the server ended the stream")

    if args.cluster:
        # The cluster client makes one _NodeClient per node it needs.
        cluster_client._NodeClient = Link  # type: ignore[misc]

    clients = []
    for slot, i in enumerate(indexes):
        # The Streamer is started alongside the gateways, so give it time to
        # come up even on a loaded machine.
        client: Any
        if args.cluster:
            client = cluster_client.ClusterClient(cluster=args.cluster, gateway_id=f"gw-{i}",
                                                  connect_timeout=60.0)
        else:
            client = Gateway(args.target, gateway_id=f"gw-{i}", batch=args.batch,
                             connect_timeout=60.0)
        client.slot = slot
        clients.append(client)
    for client in clients:
        await client.__aenter__()
    specs: list[Any] = []
    if args.relay:
        for client in clients:
            await client.subscribe("messages", database="app", subscription_id="all")
    else:
        names = {f"gw-{i}": client for i, client in zip(indexes, clients, strict=True)}
        specs = [s for s in Workload(args.n, seed=args.seed, gateways=args.gateways)
                 .subscriptions() if s.gateway in names]

        async def register(client: StreamerClient, mine: list[Any]) -> None:
            if args.batch:
                results = await client.subscribe_many(Subscription(
                    s.collection, filters=s.filters, expression=s.expression or "",
                    database=s.database, subscription_id=s.id) for s in mine)
                refused = [r for r in results if not isinstance(r, str)]
                if refused:
                    raise refused[0]
                return
            for i in range(0, len(mine), IN_FLIGHT):
                await asyncio.gather(*(
                    client.subscribe(
                        s.collection, filters=s.filters, expression=s.expression or "",
                        database=s.database, subscription_id=s.id,
                    )
                    for s in mine[i:i + IN_FLIGHT]
                ))

        if args.one_at_a_time:
            for name, client in names.items():
                await register(client, [s for s in specs if s.gateway == name])
        else:
            await asyncio.gather(*(
                register(client, [s for s in specs if s.gateway == name])
                for name, client in names.items()
            ))
    loop = asyncio.get_running_loop()
    rehome: dict[str, Any] = {"affected": []}

    def rehomed() -> dict[str, Any]:
        """How many of the killed node's subscriptions are not yet answered
        by a live node, and not yet live there (answered live, or caught
        up after their marker); when each count first reached 0 (the
        driver polls)."""
        node = rehome.get("node")
        unanswered = unlive = 0
        for client, sub_id in rehome["affected"]:
            link = client._home.get(sub_id)
            if link is None or link.key.partition("@")[0] == node or (
                    sub_id in client._waiters or link.awaiting(sub_id)):
                unanswered += 1
                unlive += 1
            elif sub_id not in link._live_since:
                unlive += 1
        now = time.time()
        if unanswered == 0 and rehome.get("answered_at") is None:
            rehome["answered_at"] = now
        if unlive == 0 and rehome.get("live_at") is None:
            rehome["live_at"] = now
        return {"affected": len(rehome["affected"]), "unanswered": unanswered,
                "not_live": unlive, "answered_at": rehome.get("answered_at"),
                "live_at": rehome.get("live_at"),
                "subscriptions": sum(len(c._requests) for c in clients)}

    def command(line: str) -> None:
        word = line.strip()
        if word == "reset":
            state["deliveries"], state["hist"] = 0, {}
            print("ok", flush=True)

        elif word == "report":
            print(json.dumps({"deliveries": state["deliveries"], "hist": state["hist"],
                              "last_index": max(last)}), flush=True)

        elif word.startswith("kill ") and args.cluster:
            # A node was killed: which subscriptions were at it, to follow
            # until each is live again at another node.
            node = word.split()[1]
            rehome["node"], rehome["since"] = node, time.time()
            rehome["answered_at"] = rehome["live_at"] = None
            rehome["affected"] = [(client, s) for client in clients
                                  for s in list(client._home)
                                  if client.node_of(s) == node]
            print(json.dumps({"affected": len(rehome["affected"])}), flush=True)

        elif word == "rehome" and args.cluster:
            print(json.dumps(rehomed()), flush=True)

    def stdin_reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(command, line)
        loop.call_soon_threadsafe(stop.set)

    stop = asyncio.Event()
    print(f"ready {max(len(specs), 1)}", flush=True)
    threading.Thread(target=stdin_reader, daemon=True).start()

    await stop.wait()
    for client in clients:
        await client.close()


# --------------------------------------------------------------------- relay
async def _relay(args: argparse.Namespace) -> None:
    """A pass-through: the Puller's events, framed as the Streamer frames
    them, to every connected gateway; no decoding, no matching."""
    from streamer.node.delivery import (
        GatewayQueue,
        delivery_message,
        frame_event,
        subscription_field,
    )
    from streamer.node.metrics import MetricsServer, PauseCollector
    from streamer.node.pauses import PauseMonitor
    from streamer.node.server import SERVICE_NAME
    from streamer.protocol import puller_v1_pb2 as puller_pb
    from streamer.protocol import puller_v1_pb2_grpc as puller_grpc
    from streamer.protocol.streamer_v1_pb2 import (
        GatewayMessage,
        HeartbeatAck,
        OperationType,
        StreamerMessage,
        SubscribeResponse,
    )
    from streamer.transport import KEEPALIVE_OPTIONS, SERVER_OPTIONS

    queues: list[GatewayQueue] = []
    subscription = [subscription_field("all")]
    insert, update = OperationType.OPERATION_TYPE_INSERT, OperationType.OPERATION_TYPE_UPDATE

    async def stream(
        requests: AsyncIterator[GatewayMessage], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        queue = GatewayQueue(context.write, capacity=1_000_000, max_bytes=1 << 40)
        writer = asyncio.create_task(queue.run())
        queues.append(queue)
        try:
            async for message in requests:
                kind = message.WhichOneof("payload")
                if kind == "hello" and message.hello.batch_delivery:
                    queue.enable_batches(message.hello.max_batch)
                elif kind == "subscribe":
                    queue.offer(StreamerMessage(subscribe_response=SubscribeResponse(
                        subscription_id=message.subscribe.subscription_id, success=True,
                    )).SerializeToString())
                elif kind == "heartbeat":
                    queue.offer(StreamerMessage(heartbeat_ack=HeartbeatAck(
                        timestamp=message.heartbeat.timestamp)).SerializeToString())
        finally:
            queues.remove(queue)
            queue.close()
            writer.cancel()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=GatewayMessage.FromString, response_serializer=None)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": handler}),))
    server.add_insecure_port(args.listen)
    await server.start()
    # The same pause log as the Streamer's, so the two can be compared.
    pauses = PauseMonitor()
    monitor = asyncio.create_task(pauses.run())
    metrics = MetricsServer(*args.metrics, PauseCollector(pauses))

    def relay(event: puller_pb.PullerEvent) -> None:
        if not event.HasField("change_event"):
            return
        change = event.change_event
        message = delivery_message(subscription, frame_event(
            change.event_id, change.database, change.mgo_coll, change.mgo_doc_id,
            insert if change.op_type == "insert" else update,
            change.full_doc, change.timestamp, event.progress,
        ))
        for queue in queues:
            queue.offer(message)

    batched, after = True, ""
    try:
        while True:
            try:
                async with grpc.aio.insecure_channel(args.puller, options=KEEPALIVE_OPTIONS) as ch:
                    stub = puller_grpc.PullerServiceStub(ch)  # type: ignore[no-untyped-call]
                    request = puller_pb.SubscribeRequest(consumer_id="relay", after=after)
                    if batched:
                        async for batch in stub.SubscribeBatch(request):
                            for event in batch.events:
                                relay(event)
                            after = batch.events[-1].progress
                    else:
                        async for event in stub.Subscribe(request):
                            relay(event)
                            after = event.progress
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and batched:
                    batched = False
                    continue
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    after = ""  # a new Puller log: from its live head
                    continue
            await asyncio.sleep(0.1)
    finally:
        monitor.cancel()
        metrics.close()


# -------------------------------------------------------------------- driver
@dataclass
class Config:
    n: int = 100_000
    gateways: int = 8
    rates: list[int] = field(default_factory=lambda: [5_000, 10_000, 30_000, 50_000])
    plain_rates: list[int] = field(default_factory=lambda: [5_000, 10_000])
    seconds: float = 10.0
    warmup: float = 4.0
    search_max: bool = True
    variants: list[str] = field(default_factory=lambda: ["relay", "batched", "plain"])
    profile: str | None = None  # py-spy raw output prefix; the batched 10k and 50k runs
    profile_rates: list[int] = field(default_factory=lambda: [10_000, 50_000])
    seed: int = 1
    cycle: int = CYCLE
    # Gateway clients per gateway process: they share one event loop and
    # one gRPC poller, which the one core left for the load generator needs.
    clients_per_process: int = 4
    out: Path | None = None
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))




def _pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(pid, cpus)


class _Probe:
    """Follows the Puller's head position through heartbeats (a filtered
    ``Subscribe`` that matches no collection)."""

    def __init__(self, target: str) -> None:
        self.head = 0
        self._closed = False
        self._channel = grpc.insecure_channel(target)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._call: Any = None
        self._thread.start()

    def _run(self) -> None:
        from streamer.protocol import puller_v1_pb2 as pb
        from streamer.protocol import puller_v1_pb2_grpc as pb_grpc

        stub = pb_grpc.PullerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        request = pb.SubscribeRequest(consumer_id="probe", collections=["-probe-"])
        while not self._closed:
            try:
                self._call = stub.Subscribe(request)
                for event in self._call:
                    self.head = int(event.progress.rsplit(":", 1)[1])
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return
            except ValueError:  # the channel was closed
                return
            time.sleep(0.05)

    def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._channel.close()


@dataclass
class _Gateway:
    proc: subprocess.Popen[str]

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"gateway process {self.proc.pid} ended ({self.proc.poll()})")
        return line


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class _Setup:
    """One variant's Streamer (or relay) and gateways, with Pullers per rate."""

    def __init__(self, config: Config, variant: str, work: Path, stderr: IO[str]) -> None:
        self.config, self.variant, self.work, self.stderr = config, variant, work, stderr
        self.puller_port = free_port()
        self.port = free_port()
        self.server: subprocess.Popen[Any] | None = None
        self.metrics_port = free_port()
        self.gateways: list[_Gateway] = []
        self.puller: subprocess.Popen[Any] | None = None
        self.probe: _Probe | None = None
        self.register_s = 0.0

    def start(self) -> None:
        py = sys.executable
        target = f"127.0.0.1:{self.puller_port}"
        if self.variant == "relay":
            cmd = [py, "-m", "streamer.tools.benchmark", "relay", "--puller", target,
                   "--listen", f"127.0.0.1:{self.port}",
                   "--metrics", f"127.0.0.1:{self.metrics_port}"]
        else:
            cmd = [py, "-m", "streamer", "serve", "--listen", f"127.0.0.1:{self.port}",
                   "--puller", target, "--state-dir", str(self.work / f"state-{self.variant}"),
                   "--log-level", "WARNING", "--metrics", f"127.0.0.1:{self.metrics_port}",
                   "--gateway-queue", "1000000", "--session-ttl", "600",
                   # Each rate has a Puller with a new log, which refuses the
                   # marker saved from the last one: start at its head.
                   "--on-marker-refused", "resume-from-head"]
        self.server = subprocess.Popen(cmd, stderr=self.stderr)
        _pin(self.server.pid, {1})
        count = self.config.gateways
        per = max(1, self.config.clients_per_process)
        groups = [list(range(count))[i:i + per] for i in range(0, count, per)]
        start = time.perf_counter()
        for group in groups:
            cmd = [py, "-m", "streamer.tools.benchmark", "gateway", "--target",
                   f"127.0.0.1:{self.port}", "--index", ",".join(map(str, group)), "--gateways",
                   str(self.config.gateways), "--n", str(self.config.n),
                   "--seed", str(self.config.seed)]
            if self.variant == "plain":
                cmd.append("--plain")
            if self.variant == "relay":
                cmd.append("--relay")
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=self.stderr, text=True, bufsize=1)
            self.gateways.append(_Gateway(proc))
        for gateway in self.gateways:
            if not gateway.line().startswith("ready"):
                raise RuntimeError("a gateway did not start")
        self.register_s = time.perf_counter() - start

    def start_puller(self, rate: int) -> None:
        log_dir = Path(tempfile.mkdtemp(prefix=f"puller-{rate}-", dir=self.work))
        cmd = [sys.executable, "-m", "streamer", "puller", "--workload", "chat",
               "--rate", str(rate), "--seed", str(self.config.seed), "--stamp-event-ids",
               "--cycle", str(self.config.cycle),
               "--log-dir", str(log_dir), "--listen", f"127.0.0.1:{self.puller_port}",
               "--heartbeat-seconds", str(PROBE_HEARTBEAT), "--log-level", "WARNING"]
        if self.variant == "plain":
            cmd.append("--no-subscribe-batch")
        self.puller = subprocess.Popen(cmd, stderr=self.stderr)
        self.probe = _Probe(f"127.0.0.1:{self.puller_port}")

    def stop_puller(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        _stop(self.puller)
        self.puller = None

    def stop(self) -> None:
        self.stop_puller()
        for gateway in self.gateways:
            if gateway.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    gateway.proc.stdin.close()
        for gateway in self.gateways:
            try:
                gateway.proc.wait(3)
            except subprocess.TimeoutExpired:  # e.g. still registering
                _stop(gateway.proc)
        _stop(self.server)

    def ask(self, word: str) -> list[str]:
        for gateway in self.gateways:
            gateway.send(word)
        return [gateway.line() for gateway in self.gateways]

    def scrape(self) -> Samples:
        """The Streamer's (or the relay's) metrics; empty if unreachable."""
        try:
            return scrape(f"127.0.0.1:{self.metrics_port}")
        except OSError:
            return {}

    def _wait_for_flow(self, limit: float = 60.0) -> None:
        """Until the new Puller produces and its events reach the gateways
        (the Streamer reconnects to it with backoff)."""
        assert self.probe is not None
        deadline = time.monotonic() + limit
        while self.probe.head == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.ask("reset")
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if sum(json.loads(x)["deliveries"] for x in self.ask("report")) > 0:
                return
        raise RuntimeError(f"no events reached the gateways within {limit:g} s")

    def load_pids(self) -> list[int]:
        pids = [os.getpid(), *(g.proc.pid for g in self.gateways)]
        if self.puller is not None:
            pids.append(self.puller.pid)
        return pids

    def measure(self, rate: int) -> dict[str, Any]:
        """One offered rate: warm-up, then the measured window."""
        assert self.server is not None
        config = self.config
        self.start_puller(rate)
        try:
            assert self.probe is not None
            self._wait_for_flow()
            time.sleep(config.warmup)
            spy = None
            if (config.profile and self.variant == "batched" and rate in config.profile_rates):
                spy = subprocess.Popen(
                    [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                     "record", "--pid", str(self.server.pid), "--format", "raw",
                     "--output", f"{config.profile}.{rate}", "--duration",
                     str(int(config.seconds)), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=self.stderr,
                )
            load = self.load_pids()
            assert self.puller is not None
            puller_pid = self.puller.pid
            self.ask("reset")
            before = [json.loads(x) for x in self.ask("report")]
            m0 = self.scrape()
            t0, head0 = time.perf_counter(), self.probe.head
            cpu0 = cpu_seconds(self.server.pid)
            load0 = sum(cpu_seconds(p) for p in load)
            puller0 = cpu_seconds(puller_pid)
            time.sleep(config.seconds)
            after = [json.loads(x) for x in self.ask("report")]
            t1, head1 = time.perf_counter(), self.probe.head
            m1 = self.scrape()
            cpu1 = cpu_seconds(self.server.pid)
            load1 = sum(cpu_seconds(p) for p in load)
            puller1 = cpu_seconds(puller_pid)
            if spy is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
        finally:
            self.stop_puller()
        elapsed = t1 - t0
        seen0, seen1, hist = window_of(before, after)
        events = seen1 - seen0
        produced = head1 - head0
        backlog = max(head1 - seen1, 0)  # the probe's head is up to 0.1 s old
        # The window's events reached the gateways as fast as the Puller
        # made them, and what is left over is under a quarter second's worth.
        sustained = events >= SUSTAINED_SHARE * produced and backlog <= max(0.25 * rate, 500)
        cpu = cpu1 - cpu0
        return {
            "variant": self.variant,
            "offered_per_s": rate,
            "produced_per_s": produced / elapsed,
            "events_per_s": events / elapsed,
            "sustained": sustained,
            "backlog_events": backlog,
            "deliveries_per_s": sum(r["deliveries"] for r in after) / elapsed,
            "latency_p50_ms": bucket_quantile(hist, 0.50) / 1e6,
            "latency_p99_ms": bucket_quantile(hist, 0.99) / 1e6,
            "latency_p999_ms": bucket_quantile(hist, 0.999) / 1e6,
            "latency_samples": sum(hist.values()),
            # The Streamer's own histogram (--metrics): from the arrival of
            # the Puller message carrying an event to its deliveries queued.
            "ingest_enqueue_p50_ms": histogram_quantile(
                0.50, latency_buckets(m1), latency_buckets(m0)) * 1e3,
            "ingest_enqueue_p99_ms": histogram_quantile(
                0.99, latency_buckets(m1), latency_buckets(m0)) * 1e3,
            # The pause log (streamer.node.pauses), Streamer and relay alike:
            # the longest the event loop was held in the window (the upper
            # bound of its bucket), and the time spent in collections.
            "longest_pause_ms": longest_pause(m1, m0) * 1e3,
            "gc_ms_per_s": (gc_seconds(m1) - gc_seconds(m0)) / elapsed * 1e3,
            "latency_sampling": f"every {SAMPLE_EVERY}th delivery",
            "cpu_s_per_1000_events": cpu / max(events, 1) * 1000,
            "cpu_utilisation": cpu / elapsed,
            "rss_mib": rss_mib(self.server.pid),
            # CPU 0 holds the Puller, the gateways and this driver: near
            # 100 % the load generator, not the Streamer, sets the pace.
            "load_generator_utilisation": (load1 - load0) / elapsed,
            "puller_utilisation": (puller1 - puller0) / elapsed,
            "seconds": elapsed,
        }


def _search_max(config: Config, setup: _Setup, runs: list[dict[str, Any]]) -> None:
    """The maximum sustainable rate: bisect (in steps of 500/s, at most
    ``MAX_PROBES`` runs) between the highest offered rate that held and the
    lowest that did not (twice the highest, when every rate held)."""
    held = [r["offered_per_s"] for r in runs if r["sustained"]]
    failed = [r["offered_per_s"] for r in runs if not r["sustained"]]
    low = max(held, default=0)
    high = min((r for r in failed if r > low), default=2 * max(r["offered_per_s"] for r in runs))
    for _ in range(MAX_PROBES):
        rate = (low + high) // 2 // 500 * 500
        if rate <= low or rate >= high:
            break
        run = setup.measure(rate)
        run["max_search"] = True
        runs.append(run)
        config.log(_line(run))
        if run["sustained"]:
            low = rate
        else:
            high = rate


def _variant(config: Config, variant: str, work: Path, stderr: IO[str]) -> dict[str, Any]:
    setup = _Setup(config, variant, work, stderr)
    rates = config.plain_rates if variant == "plain" else config.rates
    runs: list[dict[str, Any]] = []
    try:
        setup.start()
        config.log(f"{variant}: {setup.register_s:.1f} s to start and register")
        for rate in rates:
            runs.append(setup.measure(rate))
            config.log(_line(runs[-1]))
        if config.search_max and variant != "relay":
            _search_max(config, setup, runs)
    finally:
        setup.stop()
    return {"register_s": setup.register_s, "runs": runs}


def run(config: Config) -> dict[str, Any]:
    """Every variant at every rate; the results (also written to ``config.out``)."""
    own = None
    with contextlib.suppress(AttributeError, OSError):
        own = os.sched_getaffinity(0)
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(0, {0})  # children inherit CPU 0
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "pinned": (os.cpu_count() or 1) >= 2,
            "config": {k: v for k, v in asdict(config).items() if k not in ("log", "out")},
        },
        "variants": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="streamer-e2e-", dir=base) as tmp:
            work = Path(tmp)
            with open(work / "stderr.log", "w") as stderr:
                try:
                    for variant in config.variants:
                        results["variants"][variant] = _variant(config, variant, work, stderr)
                        if config.out is not None:
                            _write(config.out, results)
                except Exception:
                    # The processes' logs go with the scratch directory: a
                    # failed run shows their end first.
                    stderr.flush()
                    tail = (work / "stderr.log").read_text(errors="replace").splitlines()[-60:]
                    config.log("the processes' last log lines:\n" + "\n".join(tail))
                    raise
    finally:
        if own is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, own)
    _ratios(results)
    if config.out is not None:
        _write(config.out, results)
    return results


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _ratios(results: dict[str, Any]) -> None:
    """Streamer CPU per event over the relay's at the same offered rate."""
    # CPU per event falls as the rate rises (per-message costs are shared by
    # more events), so the relay run compared is the one whose processed
    # rate is nearest, not the one with the same offered rate.
    relay = results["variants"].get("relay", {}).get("runs", [])
    for name, variant in results["variants"].items():
        if name == "relay" or not relay:
            continue
        for run_ in variant["runs"]:
            base = min(relay, key=lambda r: abs(r["events_per_s"] - run_["events_per_s"]))
            if base is not None:
                run_["relay_events_per_s"] = base["events_per_s"]
                run_["relay_cpu_s_per_1000_events"] = base["cpu_s_per_1000_events"]
                run_["cpu_ratio_to_relay"] = (
                    run_["cpu_s_per_1000_events"] / base["cpu_s_per_1000_events"])
                # The tail next to the relay's at the same offered rate: what
                # the load generator and gRPC cost anyway.
                same = [r for r in relay if r["offered_per_s"] == run_["offered_per_s"]]
                if same:
                    run_["relay_latency_p99_ms"] = same[0]["latency_p99_ms"]
                    run_["relay_latency_p999_ms"] = same[0]["latency_p999_ms"]
                    run_["relay_longest_pause_ms"] = same[0].get("longest_pause_ms")


def _line(r: dict[str, Any]) -> str:
    return (f"{r['variant']} @{r['offered_per_s']:,}/s: produced {r['produced_per_s']:,.0f}/s, "
            f"{r['events_per_s']:,.0f} events/s "
            f"{'sustained' if r['sustained'] else 'NOT sustained'}"
            f" (backlog {r['backlog_events']:,}), p50/p99/p999 {r['latency_p50_ms']:.2f}/"
            f"{r['latency_p99_ms']:.2f}/{r['latency_p999_ms']:.2f} ms, "
            f"{r['cpu_s_per_1000_events']:.3f} CPU s/1000 ({r['cpu_utilisation']:.0%}), "
            f"load {r['load_generator_utilisation']:.0%} (Puller "
            f"{r['puller_utilisation']:.0%})")


COLUMNS = (
    "variant", "offered/s", "produced/s", "events/s", "sustained", "deliveries/s",
    "p50 ms", "p99 ms", "p99.9 ms", "longest pause ms", "GC ms/s",
    "relay p99/p99.9/pause ms", "Streamer-only p50/p99 ms", "CPU s/1k ev", "core",
    "RSS MiB", "CPU 0 (Puller)",
    "relay CPU s/1k", "ratio",
)


def _cells(r: dict[str, Any]) -> list[str]:
    ratio = r.get("cpu_ratio_to_relay")
    relay = r.get("relay_cpu_s_per_1000_events")
    return [
        r["variant"] + (" (max)" if r.get("max_search") else ""),
        f"{r['offered_per_s']:,}", f"{r['produced_per_s']:,.0f}", f"{r['events_per_s']:,.0f}",
        "yes" if r["sustained"] else "NO", f"{r['deliveries_per_s']:,.0f}",
        f"{r['latency_p50_ms']:.2f}", f"{r['latency_p99_ms']:.2f}",
        f"{r['latency_p999_ms']:.2f}",
        _ms(r.get("longest_pause_ms")), _ms(r.get("gc_ms_per_s")),
        "—" if "relay_latency_p99_ms" not in r else
        f"{r['relay_latency_p99_ms']:.2f}/{r['relay_latency_p999_ms']:.2f}/"
        f"{_ms(r.get('relay_longest_pause_ms'))}",
        "—" if "ingest_enqueue_p99_ms" not in r or r["ingest_enqueue_p99_ms"] != r[
            "ingest_enqueue_p99_ms"] else
        f"{r['ingest_enqueue_p50_ms']:.2f}/{r['ingest_enqueue_p99_ms']:.2f}",
        f"{r['cpu_s_per_1000_events']:.3f}",
        f"{r['cpu_utilisation']:.0%}", f"{r['rss_mib']:.0f}",
        f"{r['load_generator_utilisation']:.0%} ({r['puller_utilisation']:.0%})",
        "—" if relay is None else f"{relay:.3f}", "—" if ratio is None else f"{ratio:.2f}",
    ]


def _ms(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.1f}"


def render(results: dict[str, Any]) -> list[str]:
    """The results as a Markdown table with a heading line and the verdicts."""
    meta = results["meta"]
    c = meta["config"]
    lines = [
        f"streamer end-to-end benchmark — {meta['date']}, host {meta['host']}, "
        f"{meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}; "
        f"N={c['n']:,} subscriptions over {c['gateways']} gateways, "
        f"{c['seconds']:g} s windows after {c['warmup']:g} s warm-up; "
        + ("Streamer on CPU 1, Puller + gateways + driver on CPU 0" if meta["pinned"]
           else "not pinned"),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for variant in results["variants"].values():
        for r in variant["runs"]:
            lines.append("| " + " | ".join(_cells(r)) + " |")
    lines.append("")
    lines += verdicts(results)
    return lines


def verdicts(results: dict[str, Any]) -> list[str]:
    """PASS/MISS against the three targets (batching gateways, batched ingest)."""
    runs = results["variants"].get("batched", {}).get("runs", [])
    out = []
    for rate, limit in ((10_000, 2.0), (50_000, 10.0)):
        r = next((x for x in runs if x["offered_per_s"] == rate and not x.get("max_search")),
                 None)
        if r is None:
            out.append(f"{rate:,} events/s with p99 <= {limit:g} ms: not measured")
            continue
        ok = r["sustained"] and r["latency_p99_ms"] <= limit
        out.append(
            f"{rate:,} events/s sustained with p99 <= {limit:g} ms: {'PASS' if ok else 'MISS'} "
            f"({r['events_per_s']:,.0f} events/s of {r['produced_per_s']:,.0f} produced, "
            f"{'sustained' if r['sustained'] else 'not sustained'}, p99 "
            f"{r['latency_p99_ms']:.2f} ms)")
    for r in runs:
        if "relay_latency_p99_ms" in r and not r.get("max_search"):
            ok = r["sustained"] and r["latency_p99_ms"] <= 2 * r["relay_latency_p99_ms"]
            out.append(
                f"{r['offered_per_s']:,} events/s: Streamer p99 within 2x the relay's p99: "
                f"{'PASS' if ok else 'MISS'} (p99 {r['latency_p99_ms']:.2f} / p99.9 "
                f"{r['latency_p999_ms']:.2f} ms, longest pause {_ms(r.get('longest_pause_ms'))}"
                f" ms; relay p99 {r['relay_latency_p99_ms']:.2f} / p99.9 "
                f"{r['relay_latency_p999_ms']:.2f} ms, longest pause "
                f"{_ms(r.get('relay_longest_pause_ms'))} ms)")
    # Only where the Streamer kept up: an unsustained run's CPU per event
    # belongs to whatever rate it managed, not to the one offered.
    ratios = [(x["events_per_s"], x["cpu_ratio_to_relay"]) for x in runs
              if "cpu_ratio_to_relay" in x and x["sustained"]]
    if ratios:
        worst = max(r for _, r in ratios)
        out.append(f"Streamer CPU per event <= 2x the relay's: {'PASS' if worst <= 2 else 'MISS'} "
                   f"(sustained runs: {', '.join(f'{r:.2f} at {e:,.0f}/s' for e, r in ratios)})")
    for name, variant in results["variants"].items():
        if name == "relay":
            continue
        held = [x for x in variant["runs"] if x["sustained"]]
        if held:
            top = max(held, key=lambda x: x["events_per_s"])
            out.append(f"{name}: highest sustained {top['events_per_s']:,.0f} events/s "
                       f"(offered {top['offered_per_s']:,}/s), p99 {top['latency_p99_ms']:.2f} ms")
    return out


# ----------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``streamer bench e2e``."""

    rate = integer(1, int(MAX_RATE))

    def rates(text: str) -> list[int]:
        return [rate(x) for x in text.split(",") if x]

    def variants(text: str) -> str:
        for name in text.split(","):
            one_of("relay", "batched", "plain")(name)
        return text

    parser.add_argument("--n", type=integer(1), default=100_000, metavar="N",
                        help="subscriptions, spread over --gateways gateways")
    parser.add_argument("--gateways", type=integer(1, 64), default=8, metavar="G",
                        help="gateways (StreamerClients, each its own stream and gateway id)")
    parser.add_argument("--clients-per-process", type=integer(1, 64), default=4, metavar="K",
                        help="gateways hosted by one gateway process")
    parser.add_argument("--rates", type=rates, default=[5_000, 10_000, 30_000, 50_000],
                        metavar="R,R,...", help="offered rates of the batched variant "
                        "and the relay (events/s)")
    parser.add_argument("--plain-rates", type=rates, default=[5_000, 10_000],
                        metavar="R,R,...", help="offered rates of the plain variant")
    parser.add_argument("--seconds", type=real(0, above=True), default=10.0,
                        help="measured window per rate")
    parser.add_argument("--warmup", type=real(0), default=4.0, help="warm-up per rate")
    parser.add_argument("--variants", type=variants, default="relay,batched,plain",
                        help="which of relay, batched (Hello gateways, SubscribeBatch) and "
                        "plain (plain gateways, Subscribe) to run")
    parser.add_argument("--no-max", action="store_true",
                        help="skip the search for the maximum sustainable rate")
    parser.add_argument("--profile", default=None, metavar="PREFIX",
                        help="py-spy the Streamer at 10k and 50k (batched): PREFIX.<rate>")
    parser.add_argument("--out", type=Path, default=Path("bench/results/e2e.json"),
                        help="results JSON")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: N=2000, 2 gateways, 2000 events/s, 2 s windows")


def config_from(args: argparse.Namespace) -> Config:
    config = Config(
        n=args.n, gateways=args.gateways, rates=args.rates, plain_rates=args.plain_rates,
        seconds=args.seconds, warmup=args.warmup, search_max=not args.no_max,
        clients_per_process=args.clients_per_process,
        variants=[v for v in args.variants.split(",") if v], profile=args.profile,
        out=args.out,
    )
    if args.quick:
        config.n, config.gateways, config.seconds, config.warmup = 2_000, 2, 2.0, 2.0
        config.rates, config.plain_rates, config.search_max = [2_000], [2_000], False
        config.cycle = 2_000
    return config


def cli_main(argv: Sequence[str]) -> int:
    """``streamer bench ARGV`` (one benchmark so far: ``e2e``)."""
    parser = ArgumentParser(
        prog="streamer bench",
        description="Benchmarks of the service as shipped (see docs/benchmarks.md).",
    )
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    e2e = benches.add_parser(
        "e2e", help="Puller, Streamer and gateways as processes on loopback",
        description="The end-to-end benchmark: per offered rate, events/s sustained, "
        "deliveries/s, Puller→gateway latency, Streamer CPU and RSS, against a "
        "pass-through relay; batching and plain gateways. Pins the Streamer to CPU 1 "
        "and everything else to CPU 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(e2e)
    args = parser.parse_args(argv)
    results = run(config_from(args))
    print("\n".join(render(results)))
    if args.out is not None:
        print(f"figures written to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamer.tools.benchmark gateway|relay``: the benchmark's own processes."""
    parser = argparse.ArgumentParser(prog="python -m streamer.tools.benchmark")
    roles = parser.add_subparsers(dest="role", required=True)
    gateway = roles.add_parser("gateway")
    target = gateway.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", help="HOST:PORT of one Streamer")
    target.add_argument("--cluster", help="etcd://HOST:PORT[,...]: cluster clients "
                        "(StreamerClient(cluster=...)), which also answer 'kill NODE' and "
                        "'rehome' on stdin")
    gateway.add_argument("--index", required=True, help="gateway numbers, comma-separated")
    gateway.add_argument("--gateways", type=int, default=8)
    gateway.add_argument("--n", type=int, default=100_000)
    gateway.add_argument("--seed", type=int, default=1)
    gateway.add_argument("--plain", dest="batch", action="store_false")
    gateway.add_argument("--relay", action="store_true")
    gateway.add_argument("--sample-every", type=int, default=SAMPLE_EVERY)
    gateway.add_argument("--one-at-a-time", action="store_true",
                         help="register the gateways' subscriptions one gateway after another")
    relay = roles.add_parser("relay")
    relay.add_argument("--puller", required=True)
    relay.add_argument("--listen", required=True)
    relay.add_argument("--metrics", type=address, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_gateway(args) if args.role == "gateway" else _relay(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
