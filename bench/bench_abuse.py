"""Abuse: honest gateways' latency while other gateways misbehave, against a
quiet baseline measured in the same run (docs/reliability.md, Abuse).

Processes on loopback, as ``streamer bench e2e`` runs them: ``streamer
puller --workload chat --stamp-event-ids`` at ``RATE`` events/s, ``streamer
serve`` (pinned to CPU 1; everything else on CPU 0 when there are two), and
the honest gateways: the benchmark's gateway processes (``python -m
streamer.tools.benchmark gateway``, two ``StreamerClient``s each) holding
the N subscriptions of ``Workload(N, seed=1, gateways=G)`` and timing every
4th delivery from the Puller's emit stamp.

Phases, one after the other, each a warm-up then a measured window: each
abuser alone, then all four together, each phase after a quiet one (its
baseline: the machine is shared, and load of other users' that comes or
goes must not be taken for the abuser's), and a last quiet one. The
abusers are processes of this file (``python bench/bench_abuse.py abuser
KIND``, at nice 10 on the load generator's core); all but ``reconnect``
speak the protocol on a raw gRPC stream, because ``StreamerClient`` never
does what they do:

- ``invalid``: ``INVALID_RATE`` subscribe requests per second with bad
  filters or expressions; each must be answered ``success=false,
  code=invalid_argument``, and the stream must stay open.
- ``maximal``: requests exactly at the size limits (``--max-request-bytes``,
  ``--max-list-values``, the expression length, ``--max-filters``, all at
  once), which must be accepted, alternating with requests one past one
  limit, which must get ``resource_exhausted`` naming that limit; as fast
  as they are answered (``MAXIMAL_IN_FLIGHT`` outstanding), the oldest
  accepted ones unsubscribed beyond ``MAXIMAL_LIVE``.
- ``noread``: subscribes ``NOREAD_SUBS`` times to the whole ``messages``
  collection and never reads: it must be cut off with ``RESOURCE_EXHAUSTED``
  (by the queue bound or the ``--stall-seconds`` watchdog; the status
  reaches a client only once it reads, so after ``NOREAD_HOLD`` seconds it
  reads to the end and reconnects), and, when it is alone, the Streamer's
  RSS must come back (within 10 % of its level before the phase, once
  settled).
- ``reconnect``: a ``StreamerClient`` per cycle: connect, Hello, one
  subscribe, close, repeatedly, under one gateway id; every subscribe must
  succeed (a refused Hello is retried by the client).

Per phase: the honest gateways' p50/p99/p99.9 (every 4th delivery), the
Streamer's CPU, RSS (start, peak, end, and settled after the abusers
left), its own ingest→enqueue p99, longest event-loop pause and time in
garbage collection (its ``/metrics``), each core's busy share (the machine
is shared), and what each abuser got. Target: the honest p99 stays
within 2x the p99 of the quiet phase before; a miss is reported, not
asserted.

Sizes (``STREAMER_BENCH_ABUSE_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``N`` 20000 (2000), ``GATEWAYS`` 4 (2),
``RATE`` 2000 (500), ``SECONDS`` 20 (6), ``WARMUP`` 3 (1), ``SETTLE`` 5 (2),
``INVALID_RATE`` 10000 (2000), ``MAXIMAL_LIVE`` 500 (50),
``MAXIMAL_IN_FLIGHT`` 4, ``NOREAD_SUBS`` 1000, ``NOREAD_HOLD`` 8 (5),
``STALL`` (``--stall-seconds``) 30 (2). Figures: ``bench/results/abuse.json``
(and the processes' logs in ``bench/results/abuse-logs/`` when a check
failed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from reliability import (
    Children,
    Honest,
    count,
    counter,
    cpu_busy,
    cpu_share,
    cutoffs_logged,
    events_total,
    keep_logs,
    line_of,
    log_errors,
    machine,
    puller_argv,
    record,
    serve_argv,
    size,
    table,
    wait_for,
    work_dir,
)

from streamer.node.server import SERVICE_NAME
from streamer.node.subscriptions import Limits
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    Hello,
    ListValue,
    StreamerMessage,
    SubscribeRequest,
    UnsubscribeRequest,
    Value,
)
from streamer.tools.benchmark import bucket_quantile
from streamer.tools.measure import (
    cpu_seconds,
    free_port,
    gc_seconds,
    histogram_quantile,
    latency_buckets,
    longest_pause,
    rss_mib,
    scrape,
)
from streamer.transport import KEEPALIVE_OPTIONS
from streamer.wire import MAX_MESSAGE_BYTES

N = count("STREAMER_BENCH_ABUSE_N", 20_000, 2_000)
GATEWAYS = count("STREAMER_BENCH_ABUSE_GATEWAYS", 4, 2)
RATE = size("STREAMER_BENCH_ABUSE_RATE", 2000, 500)
SECONDS = size("STREAMER_BENCH_ABUSE_SECONDS", 20, 6)
WARMUP = size("STREAMER_BENCH_ABUSE_WARMUP", 3, 1)
SETTLE = size("STREAMER_BENCH_ABUSE_SETTLE", 5, 2)
INVALID_RATE = size("STREAMER_BENCH_ABUSE_INVALID_RATE", 10_000, 2_000)
MAXIMAL_LIVE = count("STREAMER_BENCH_ABUSE_MAXIMAL_LIVE", 500, 50)
MAXIMAL_IN_FLIGHT = count("STREAMER_BENCH_ABUSE_MAXIMAL_IN_FLIGHT", 4, 4)
NOREAD_SUBS = count("STREAMER_BENCH_ABUSE_NOREAD_SUBS", 1000, 1000)
NOREAD_HOLD = size("STREAMER_BENCH_ABUSE_NOREAD_HOLD", 8, 5)
STALL = size("STREAMER_BENCH_ABUSE_STALL", 30, 2)
SEED = 1
CLIENTS_PER_PROCESS = 2
# The Puller repeats its first events (new ids and stamps): generating the
# workload must not compete with the gateways for the load generator's core.
CYCLE = 20_000
# The never-reading gateway before the maximal requests: what the allocator
# keeps of the latter's memory would be counted against the former's RSS.
ABUSERS = ("invalid", "noread", "reconnect", "maximal")
# Abusers run niced: they share the load generator's core with the honest
# gateways and the Puller, whose latency they must not inflate there (in
# production they are other machines).
ABUSER_NICE = 10
# Each abuse phase has the quiet window just before it as its baseline: the
# machine is shared, and another user's load that comes or goes during the
# run would otherwise be counted for or against an abuser.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((name, phase) for kind in (*ABUSERS, "all")
      for name, phase in (("quiet", ()), (kind, ABUSERS if kind == "all" else (kind,)))),
    ("quiet", ()),
)
TARGET_RATIO = 2.0
RSS_BACK = 1.10  # RSS after the never-reading gateway, over RSS before it
LIMITS = Limits()
METHOD = f"/{SERVICE_NAME}/Stream"
# The abusers get every size from the driver (children see no STREAMER_*
# variable).
ABUSER_ARGS = (
    "--rate", f"{INVALID_RATE:g}", "--live", str(MAXIMAL_LIVE),
    "--in-flight", str(MAXIMAL_IN_FLIGHT), "--subscriptions", str(NOREAD_SUBS),
    "--hold", f"{NOREAD_HOLD:g}",
)


# ------------------------------------------------------------------ abusers
class RawStream:
    """A gateway stream without the client library: serialized messages in
    and out, its own TCP connection."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[
            *KEEPALIVE_OPTIONS, ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self.call = self.channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=None)()
        self._writing = asyncio.Lock()  # grpc.aio takes one write at a time

    async def write(self, message: bytes) -> None:
        async with self._writing:
            await self.call.write(message)

    async def send(self, **message: Any) -> None:
        await self.write(GatewayMessage(**message).SerializeToString())

    async def hello(self, gateway_id: str) -> None:
        await self.send(hello=Hello(gateway_id=gateway_id, batch_delivery=True,
                                    instance=secrets.token_hex(16)))

    async def status(self) -> str | None:
        """How the stream ended, if it has."""
        if not self.call.done():
            return None
        return f"{(await self.call.code()).name}: {await self.call.details()}"

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def _str(text: str) -> Value:
    return Value(string_value=text)


# Each is refused with invalid_argument (docs/semantics.md, Errors).
BAD_REQUESTS: tuple[tuple[list[Filter], str], ...] = (
    ([Filter(field="chat_id", op="~", value=_str("c1"))], ""),
    ([Filter(field="chat_id", op="==", value=Value())], ""),
    ([Filter(field="chat_id", op="in", value=_str("c1"))], ""),
    ([Filter(field="chat_id", op="in", value=Value(list_value=ListValue(
        values=[Value(list_value=ListValue())])))], ""),
    ([Filter(field="", op="==", value=_str("c1"))], ""),
    ([], "doc.chat_id == "),
    ([], "size(doc.tags) > x"),
    ([], "doc.tags.exists(t, t == 'a')"),
)


async def abuse_invalid(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    stream = RawStream(args.target)
    await stream.hello("abuser-invalid")
    requests = [
        GatewayMessage(subscribe=SubscribeRequest(
            subscription_id=f"bad-{i}", database="app", collection="messages",
            filters=filters, expression=expression,
        )).SerializeToString()
        for i, (filters, expression) in enumerate(BAD_REQUESTS)
    ]
    answers: collections.Counter[str] = collections.Counter()

    async def read() -> None:
        async for raw in stream.call:
            response = StreamerMessage.FromString(raw).subscribe_response
            answers["success" if response.success else response.code] += 1

    reader = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while not stop.is_set() and not stream.call.done():
        # A batch of whatever is due every 5 ms; a backlog (the server
        # reads no faster than it answers) is not made up in one burst.
        due = min(int((loop.time() - start) * args.rate) - sent, int(args.rate / 10))
        for _ in range(max(due, 0)):
            await stream.write(requests[sent % len(requests)])
            sent += 1
        await asyncio.sleep(0.005)
    seconds = loop.time() - start
    # The transport takes requests well ahead of the server (its flow-control
    # window holds tens of thousands of these): the answers say how fast
    # they were processed, and the backlog is answered after the last one.
    answered = sum(answers.values())
    stopped = loop.time()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while sum(answers.values()) < sent and not reader.done():
                await asyncio.sleep(0.01)
    status = await stream.status()
    reader.cancel()
    await stream.close()
    return {"sent": sent, "sent_per_s": sent / seconds, "answered_per_s": answered / seconds,
            "backlog_at_stop": sent - answered, "backlog_answered_s": loop.time() - stopped,
            "answers": dict(answers), "unanswered": sent - sum(answers.values()),
            "stream_end": status}


def expression_of(length: int, tag: str) -> str:
    """A valid, indexable CEL expression of exactly ``length`` characters:
    ``doc.chat_id in ["<tag>-00000", ...]``."""
    head, tail = "doc.chat_id in [", "]"
    items: list[str] = []
    used = len(head) + len(tail)
    while True:
        item = f'"{tag}-{len(items):05d}"'
        cost = len(item) + (2 if items else 0)
        if used + cost > length:
            break
        items.append(item)
        used += cost
    items[-1] = items[-1][:-1] + "x" * (length - used) + '"'
    text = head + ", ".join(items) + tail
    assert len(text) == length
    return text


def maximal_request(
    sub_id: str, tag: str, *, request_bytes: int, values: int, expression: int, filters: int,
) -> SubscribeRequest:
    """A request of exactly ``request_bytes`` serialized bytes, ``values``
    values in its one list filter, ``filters`` filters and an expression of
    ``expression`` characters, its values unique to ``tag`` (nothing it
    holds is shared with another request); tags of one width give requests
    of one size."""
    width, last = _fit(len(sub_id), len(tag), request_bytes, values, expression, filters)
    request = _build(sub_id, tag, values, expression, filters, width, last)
    if request.ByteSize() != request_bytes:
        raise ValueError(f"cannot build a request of {request_bytes} bytes")
    return request


def _build(sub_id: str, tag: str, values: int, expression: int, filters: int, width: int,
           last: int) -> SubscribeRequest:
    items = [_str(f"{tag}-{j:05d}".ljust(width, "v")) for j in range(values)]
    items[-1] = _str(f"{tag}-last".ljust(last, "v"))
    return SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        expression=expression_of(expression, tag),
        filters=[Filter(field="chat_id", op="in", value=Value(list_value=ListValue(values=items))),
                 *(Filter(field=f"f{k}", op="==", value=Value(int_value=k))
                   for k in range(filters - 1))],
    )


@functools.cache
def _fit(id_width: int, tag_width: int, request_bytes: int, values: int, expression: int,
         filters: int) -> tuple[int, int]:
    """The width of the list's values, and of its last one, that make a
    request of exactly ``request_bytes`` bytes."""
    sub_id, tag = "i" * id_width, "t" * tag_width
    width = 16
    size = _build(sub_id, tag, values, expression, filters, width, width).ByteSize()
    width += max(0, request_bytes - size) // values
    last = width
    for _ in range(8):  # varint lengths move by a byte at their boundaries
        size = _build(sub_id, tag, values, expression, filters, width, last).ByteSize()
        if size == request_bytes:
            break
        last += request_bytes - size
    return width, last


def maximal_kinds(limits: Limits) -> dict[str, tuple[dict[str, int], str]]:
    """What each kind of maximal request is made of, and, past a limit,
    the word its refusal must name."""
    at = {"request_bytes": limits.max_request_bytes, "values": limits.max_list_values,
          "expression": limits.max_expression_length, "filters": limits.max_filters}
    under = {**at, "request_bytes": limits.max_request_bytes - 4096}
    return {
        "at the limits": (at, ""),
        "bytes + 1": ({**at, "request_bytes": limits.max_request_bytes + 1}, "bytes"),
        "list values + 1": ({**under, "values": limits.max_list_values + 1}, "values"),
        "expression + 1": ({**under, "expression": limits.max_expression_length + 1},
                           "expression"),
        "filters + 1": ({**under, "filters": limits.max_filters + 1}, "filters"),
    }


async def abuse_maximal(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    stream = RawStream(args.target)
    await stream.hello("abuser-maximal")
    limits = Limits(max_request_bytes=args.max_request_bytes,
                    max_list_values=args.max_list_values,
                    max_expression_length=args.max_expression_length,
                    max_filters=args.max_filters)
    kinds = maximal_kinds(limits)
    over = [k for k in kinds if k != "at the limits"]
    pending: dict[str, asyncio.Future[Any]] = {}
    answers: collections.Counter[str] = collections.Counter()
    live: collections.deque[str] = collections.deque()

    async def read() -> None:
        async for raw in stream.call:
            response = StreamerMessage.FromString(raw).subscribe_response
            waiter = pending.pop(response.subscription_id, None)
            if waiter is not None:
                waiter.set_result(response)

    async def one(number: int) -> None:
        kind = "at the limits" if number % 2 == 0 else over[number // 2 % len(over)]
        spec, names = kinds[kind]
        # Values unique to the request (fixed width: the same size every time).
        sub_id = f"max-{number:09d}"
        request = maximal_request(sub_id, f"n{number:09d}", **spec)
        waiter = asyncio.get_running_loop().create_future()
        pending[sub_id] = waiter
        await stream.send(subscribe=request)
        response = await waiter
        if response.success:
            answers[f"{kind}: success"] += 1
            live.append(sub_id)
            while len(live) > args.live:
                await stream.send(unsubscribe=UnsubscribeRequest(subscription_id=live.popleft()))
                answers["unsubscribed"] += 1
        else:
            named = not names or names in response.error
            answers[f"{kind}: {response.code}" + ("" if named else " (another limit named)")] += 1

    reader = asyncio.create_task(read())
    number = 0
    running: set[asyncio.Task[None]] = set()
    while not stop.is_set() and not reader.done():
        while len(running) < args.in_flight:
            task = asyncio.create_task(one(number))
            running.add(task)
            task.add_done_callback(running.discard)
            number += 1
        await asyncio.wait([*running, reader], return_when=asyncio.FIRST_COMPLETED)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(20):
            await asyncio.gather(*running)
    status = await stream.status()
    reader.cancel()
    await stream.close()
    return {"sent": number, "answers": dict(answers), "live_at_end": len(live),
            "unanswered": len(pending), "stream_end": status}


async def abuse_noread(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    statuses: collections.Counter[str] = collections.Counter()
    details: set[str] = set()
    read_after_hold = 0
    cycle = 0
    interrupted = 0
    while not stop.is_set():
        stream = RawStream(args.target)
        try:
            await stream.hello(f"abuser-noread-{cycle}")
            for k in range(args.subscriptions):
                await stream.send(subscribe=SubscribeRequest(
                    subscription_id=f"noread-{cycle}-{k}", database="app",
                    collection="messages"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.hold)
            if stop.is_set():
                interrupted += 1
                break
            # The status comes after what the server had sent: read it all.
            try:
                async with asyncio.timeout(15):
                    async for _ in stream.call:
                        read_after_hold += 1
                code = (await stream.call.code()).name
                details.add(await stream.call.details())
            except TimeoutError:
                code = "still open after the hold and 15 s of reading"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                details.add(exc.details() or "")
            statuses[code] += 1
            cycle += 1
        finally:
            await stream.close()
    return {"cycles": cycle, "statuses": dict(statuses), "details": sorted(details),
            "interrupted_by_the_phase_end": interrupted,
            "messages_read_after_hold": read_after_hold}


async def abuse_reconnect(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    from streamer.client import StreamerClient, SubscriptionRejected

    outcomes: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()
    start = loop.time()
    cycle = 0
    while not stop.is_set():
        client = StreamerClient(args.target, gateway_id="abuser-reconnect",
                                backoff=(0.05, 0.5), connect_timeout=30)
        client.start()
        try:
            await client.subscribe("messages", database="app", filters=[("chat_id", "==", "c1")],
                                   subscription_id=f"reconnect-{cycle}", timeout=30)
            outcomes["success"] += 1
        except SubscriptionRejected as exc:
            outcomes[exc.code] += 1
        except Exception as exc:
            outcomes[type(exc).__name__] += 1
        finally:
            await client.close()
        cycle += 1
    return {"cycles": cycle, "cycles_per_s": cycle / (loop.time() - start),
            "subscribes": dict(outcomes)}


KINDS: dict[str, Callable[[argparse.Namespace, asyncio.Event], Any]] = {
    "invalid": abuse_invalid, "maximal": abuse_maximal, "noread": abuse_noread,
    "reconnect": abuse_reconnect,
}


async def _abuser(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("started", flush=True)
    report = await KINDS[args.kind](args, stop)
    print(json.dumps({"kind": args.kind, **report}), flush=True)


def abuser_main(argv: list[str]) -> None:
    """``python bench/bench_abuse.py abuser KIND --target HOST:PORT ...``:
    misbehave until SIGTERM, then print what happened as one JSON line."""
    parser = argparse.ArgumentParser(prog="bench_abuse.py abuser")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--target", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--live", type=int, required=True)
    parser.add_argument("--in-flight", type=int, required=True)
    parser.add_argument("--subscriptions", type=int, required=True)
    parser.add_argument("--hold", type=float, required=True)
    parser.add_argument("--max-request-bytes", type=int, default=LIMITS.max_request_bytes)
    parser.add_argument("--max-list-values", type=int, default=LIMITS.max_list_values)
    parser.add_argument("--max-expression-length", type=int,
                        default=LIMITS.max_expression_length)
    parser.add_argument("--max-filters", type=int, default=LIMITS.max_filters)
    logging.basicConfig(level=logging.ERROR)  # a reconnecting client warns at every cycle
    asyncio.run(_abuser(parser.parse_args(argv)))


# ------------------------------------------------------------------- driver
def _stop_abuser(children: Children, proc: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGTERM an abuser and read its report (its last line)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        Children.kill(proc)
        return {"error": "did not stop within 60 s of SIGTERM"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"no report (exit {proc.returncode}): "
                         f"{children.log(children.names[proc.pid], 5)}"}
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def _check(kind: str, report: dict[str, Any]) -> list[str]:
    """What an abuser got that it must not have (correctness, not timing)."""
    if "error" in report:
        return [f"{kind}: {report['error']}"]
    problems = []
    if kind in ("invalid", "maximal") and report["stream_end"] is not None:
        problems.append(f"{kind}: the stream ended: {report['stream_end']}")
    if kind == "invalid":
        wrong = {k: v for k, v in report["answers"].items() if k != "invalid_argument"}
        if wrong or report["unanswered"] or not report["sent"]:
            problems.append(f"invalid: sent {report['sent']}, answers {report['answers']}, "
                            f"unanswered {report['unanswered']}")
    elif kind == "maximal":
        expected = {"at the limits: success", "unsubscribed"} | {
            f"{k}: resource_exhausted" for k in maximal_kinds(LIMITS) if k != "at the limits"}
        wrong = {k: v for k, v in report["answers"].items() if k not in expected}
        if wrong or report["unanswered"] or not report["answers"].get("at the limits: success"):
            problems.append(f"maximal: answers {report['answers']}, "
                            f"unanswered {report['unanswered']}")
    elif kind == "noread":
        wrong = {k: v for k, v in report["statuses"].items() if k != "RESOURCE_EXHAUSTED"}
        if wrong or not report["cycles"]:
            problems.append(f"noread: {report['cycles']} cycle(s), statuses {report['statuses']}")
    elif kind == "reconnect":
        wrong = {k: v for k, v in report["subscribes"].items() if k != "success"}
        if wrong or not report["cycles"]:
            problems.append(f"reconnect: {report['cycles']} cycle(s), subscribes "
                            f"{report['subscribes']}")
    return problems


class Run:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children = Children(work)
        self.streamer_port, self.puller_port = free_port(), free_port()
        self.metrics = f"127.0.0.1:{free_port()}"
        self.streamer: subprocess.Popen[Any] | None = None
        self.honest: Honest | None = None
        self.problems: list[str] = []
        self.pinned = (os.cpu_count() or 1) >= 2
        self.load_cpus = {0} if self.pinned else None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.streamer_port}"

    def start(self) -> float:
        """Streamer, honest gateways (registered), Puller; events flowing.
        Returns the registration time."""
        children = self.children
        self.streamer = children.start(
            "streamer",
            serve_argv(self.streamer_port, self.puller_port, self.work / "state",
                       int(self.metrics.rsplit(":", 1)[1]), "--stall-seconds", f"{STALL:g}"),
            cpus={1} if self.pinned else None,
        )
        wait_for("the Streamer's metrics", self._scrapes, 60, [self.streamer])
        started = time.monotonic()
        self.honest = Honest.start(children, self.target, N, GATEWAYS, SEED,
                                   per_process=CLIENTS_PER_PROCESS, cpus=self.load_cpus)
        registered = time.monotonic() - started
        children.start("puller", puller_argv(
            self.puller_port, self.work / "puller-log", RATE, "--seed", str(SEED),
            "--stamp-event-ids", "--cycle", str(CYCLE)), cpus=self.load_cpus)
        self.honest.ask("reset")
        wait_for("events reaching the gateways",
                 lambda: self.honest is not None and self.honest.report()["deliveries"] > 0,
                 60, [self.streamer], every=0.2)
        time.sleep(2 * WARMUP)
        return registered

    def _scrapes(self) -> bool:
        try:
            scrape(self.metrics, timeout=2)
        except OSError:
            return False
        return True

    def phase(self, name: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        assert self.streamer is not None and self.honest is not None
        pid = self.streamer.pid
        rss_before = rss_mib(pid)
        abusers = {
            kind: self.children.start(
                f"abuser-{kind}-{name.replace(' ', '-')}",
                [__file__, "abuser", kind, "--target", self.target, *ABUSER_ARGS],
                pipes=True, cpus=self.load_cpus, nice=ABUSER_NICE,
            )
            for kind in kinds
        }
        for kind, proc in abusers.items():
            if not line_of(proc).startswith("started"):
                raise RuntimeError(f"abuser {kind} did not start")
        time.sleep(WARMUP)
        self.honest.ask("reset")
        m0, cpu0, busy0 = scrape(self.metrics), cpu_seconds(pid), cpu_busy()
        rss_start = rss_mib(pid)
        started = time.monotonic()
        peak = rss_start
        while time.monotonic() - started < SECONDS:
            time.sleep(0.25)
            peak = max(peak, rss_mib(pid))
        honest = self.honest.report()
        elapsed = time.monotonic() - started
        m1, cpu1, busy1 = scrape(self.metrics), cpu_seconds(pid), cpu_busy()
        rss_end = rss_mib(pid)
        reports = {kind: _stop_abuser(self.children, proc) for kind, proc in abusers.items()}
        time.sleep(SETTLE)
        rss_after = rss_mib(pid)
        for kind, report in reports.items():
            self.problems += [f"{name}: {p}" for p in _check(kind, report)]
        # Alone: with the others, the maximal requests' allocations (kept
        # by the allocator once freed) would be counted against it.
        if kinds == ("noread",) and rss_after > RSS_BACK * rss_before:
            self.problems.append(
                f"{name}: the Streamer's RSS did not come back: {rss_before:.0f} MiB before, "
                f"{rss_after:.0f} MiB {SETTLE:g} s after the never-reading gateway left")
        if not honest["deliveries"]:
            self.problems.append(f"{name}: the honest gateways received nothing")
        hist = honest["hist"]
        shares = cpu_share(busy0, busy1)
        return {
            "phase": name,
            "abusers": list(kinds),
            "seconds": elapsed,
            "honest_deliveries_per_s": honest["deliveries"] / elapsed,
            "honest_latency_samples": sum(hist.values()),
            "honest_p50_ms": bucket_quantile(hist, 0.50) / 1e6,
            "honest_p99_ms": bucket_quantile(hist, 0.99) / 1e6,
            "honest_p999_ms": bucket_quantile(hist, 0.999) / 1e6,
            "events_per_s": (events_total(m1) - events_total(m0)) / elapsed,
            "ingest_enqueue_p99_ms": histogram_quantile(
                0.99, latency_buckets(m1), latency_buckets(m0)) * 1e3,
            "longest_pause_ms": longest_pause(m1, m0) * 1e3,
            "gc_ms_per_s": (gc_seconds(m1) - gc_seconds(m0)) / elapsed * 1e3,
            "cutoffs": counter(m1, "streamer_lagging_cutoffs_total")
            - counter(m0, "streamer_lagging_cutoffs_total"),
            "stalled_cutoffs": counter(m1, "streamer_stalled_cutoffs_total")
            - counter(m0, "streamer_stalled_cutoffs_total"),
            "identity_refusals": counter(m1, "streamer_gateway_identity_refusals_total")
            - counter(m0, "streamer_gateway_identity_refusals_total"),
            "streamer_cpu": (cpu1 - cpu0) / elapsed,
            "cpu_busy": shares,
            "rss_before_mib": rss_before,
            "rss_start_mib": rss_start,
            "rss_peak_mib": peak,
            "rss_end_mib": rss_end,
            "rss_after_settle_mib": rss_after,
            "abusers_got": reports,
        }

    def close(self) -> None:
        self.children.close()


def run(tmp_path: Path) -> dict[str, Any]:
    if WARMUP + SECONDS <= NOREAD_HOLD + 1:
        raise ValueError("the never-reading gateway holds its stream NOREAD_HOLD seconds: a "
                         "phase (WARMUP + SECONDS) must be longer for it to finish a cycle")
    figures: dict[str, Any] = {
        "meta": machine(),
        "config": {"n": N, "gateways": GATEWAYS, "rate": RATE, "seconds": SECONDS,
                   "warmup": WARMUP, "settle": SETTLE, "invalid_rate": INVALID_RATE,
                   "maximal_live": MAXIMAL_LIVE, "maximal_in_flight": MAXIMAL_IN_FLIGHT,
                   "noread_subscriptions": NOREAD_SUBS, "noread_hold": NOREAD_HOLD,
                   "stall_seconds": STALL, "limits": dataclasses.asdict(LIMITS)},
        "phases": [],
    }
    work = work_dir(tmp_path)
    run_ = Run(work)
    own = os.sched_getaffinity(0)
    if run_.pinned:
        os.sched_setaffinity(0, {0})
    try:
        figures["register_s"] = run_.start()
        for name, kinds in PHASES:
            figures["phases"].append(run_.phase(name, kinds))
    except BaseException:
        run_.problems.append("the run failed")
        raise
    finally:
        run_.close()
        os.sched_setaffinity(0, own)
        figures["streamer_log_errors"] = log_errors(work / "streamer.log")
        figures["cutoffs_logged"] = cutoffs_logged(work / "streamer.log")
        if run_.problems:
            figures["logs"] = str(keep_logs(work, "abuse"))
        if work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)
    figures["pinned"] = run_.pinned
    figures["problems"] = run_.problems
    return figures


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def _got(report: dict[str, Any]) -> str:
    kind = report.get("kind", "?")
    if "error" in report:
        return f"{kind}: {report['error']}"
    if kind == "invalid":
        return (f"invalid: {report['sent']:,} sent ({report['sent_per_s']:,.0f}/s, answered "
                f"{report['answered_per_s']:,.0f}/s while sending, the last "
                f"{report['backlog_at_stop']:,} in {report['backlog_answered_s']:.1f} s after), "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(report["answers"].items()))
                + f", stream {'open' if report['stream_end'] is None else report['stream_end']}")
    if kind == "maximal":
        return ("maximal: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report["answers"].items()))
                + f", stream {'open' if report['stream_end'] is None else report['stream_end']}")
    if kind == "noread":
        return (f"noread: {report['cycles']} cycle(s) of {NOREAD_SUBS} subscriptions, "
                + ", ".join(f"{k} {v}" for k, v in sorted(report["statuses"].items())))
    return (f"reconnect: {report['cycles']:,} cycles ({report['cycles_per_s']:.1f}/s), "
            + ", ".join(f"subscribe {k} {v:,}" for k, v in sorted(report["subscribes"].items())))


def verdicts(figures: dict[str, Any]) -> list[tuple[float, bool | None]]:
    """Per phase, its p99 over the p99 of the quiet window before it, and
    whether that is within the target (None for a quiet window)."""
    out: list[tuple[float, bool | None]] = []
    quiet = math.nan
    for p in figures["phases"]:
        if not p["abusers"]:
            quiet = p["honest_p99_ms"]
            out.append((math.nan, None))
        else:
            ratio = p["honest_p99_ms"] / quiet
            out.append((ratio, ratio <= TARGET_RATIO))
    return out


def render(figures: dict[str, Any]) -> list[str]:
    phases = figures["phases"]
    first = phases[0]["honest_p99_ms"]
    rows = []
    for p, (ratio, ok) in zip(phases, verdicts(figures), strict=True):
        verdict = "—" if ok is None else f"{ratio:.2f}x {'PASS' if ok else 'MISS'}"
        busy = p["cpu_busy"]
        rows.append([
            p["phase"], f"{p['events_per_s']:,.0f}", f"{p['honest_deliveries_per_s']:,.0f}",
            _ms(p["honest_p50_ms"]), _ms(p["honest_p99_ms"]), verdict,
            f"{p['honest_p99_ms'] / first:.2f}x",
            _ms(p["honest_p999_ms"]), _ms(p["ingest_enqueue_p99_ms"]),
            _ms(p["longest_pause_ms"]), f"{p['gc_ms_per_s']:.1f}", f"{p['streamer_cpu']:.0%}",
            " / ".join(f"{busy.get(c, math.nan):.0%}" for c in ("cpu0", "cpu1"))
            + f" ({max(busy.get('cpu1', math.nan) - p['streamer_cpu'], 0):.0%})",
            f"{p['rss_start_mib']:.0f} / {p['rss_peak_mib']:.0f} / {p['rss_end_mib']:.0f} "
            f"→ {p['rss_after_settle_mib']:.0f}",
            f"{p['cutoffs']:.0f} ({p['stalled_cutoffs']:.0f} stalled)",
            "; ".join(_got(r) for r in p["abusers_got"].values()) or "—",
        ])
    c = figures["config"]
    lines = [
        f"N={c['n']:,} subscriptions on {c['gateways']} honest gateways, {c['rate']:g} events/s, "
        f"{c['seconds']:g} s windows after {c['warmup']:g} s; "
        + ("Streamer on CPU 1, everything else on CPU 0" if figures["pinned"] else "not pinned"),
        "",
        *table(["phase", "events/s", "honest deliveries/s", "honest p50 ms", "honest p99 ms",
                f"p99 / the quiet p99 before (target ≤ {TARGET_RATIO:g}x)",
                "p99 / the first quiet p99", "honest p99.9 ms",
                "Streamer ingest→enqueue p99 ms", "longest pause ms", "GC ms/s", "Streamer CPU",
                "CPU 0 / CPU 1 busy (CPU 1 but the Streamer)",
                "Streamer RSS MiB start / peak / end → settled",
                "cut-offs", "what the abusers got"], rows),
    ]
    cutoffs = figures.get("cutoffs_logged", [])
    lines += ["", f"Cut-offs in the Streamer's log: {len(cutoffs)}"
              + "".join(f"\n  {c['gateway']}: {c['why']}; {c['unsent_messages']:,} queued "
                        "message(s) dropped" for c in cutoffs)]
    errors = figures.get("streamer_log_errors", {})
    lines += ["", f"Streamer log: {sum(errors.values())} ERROR line(s)"
              + "".join(f"\n  {n} x {message}" for message, n in errors.items())]
    if figures["problems"]:
        lines += ["", "PROBLEMS:", *(f"  {p}" for p in figures["problems"])]
    return lines


@pytest.mark.timeout(3600)
def test_abuse(benchmark: Any, bench_report: list[str], tmp_path: Path) -> None:
    benchmark.group = "reliability"
    figures = benchmark.pedantic(run, args=(tmp_path,), rounds=1, iterations=1)
    record("abuse", bench_report, figures, render(figures), benchmark)
    assert not figures["problems"], figures["problems"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["abuser"]:
        abuser_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/bench_abuse.py abuser KIND --target HOST:PORT "
                 "(run the benchmark with pytest bench/bench_abuse.py)")
