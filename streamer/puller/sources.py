"""Where the Puller's change events come from: the ``Source`` protocol, the
workload and replay sources, and the replay-file format and its recorder.

A source runs until it has nothing more to say (or is cancelled), handing
batches of ``(ChangeEvent, source_state)`` to ``emit``, which returns once
they are durable in the replay log. ``source_state`` is opaque to the log;
the source gets the newest one back as ``resume`` after a restart, to carry
on where the log ends (a MongoDB resume token, a count of events).

Replay files are JSON lines: one object per line with the ``ChangeEvent``
fields by name (``event_id``, ``database``, ``mgo_coll``, ``mgo_doc_id``,
``op_type``, ``full_doc``, ``update_desc``, ``cluster_time``, ``timestamp``,
``txn_number``, ``backend``, ``before_doc``). ``full_doc``, ``update_desc``
and ``before_doc`` are JSON values (not strings holding JSON), ``null`` or
absent when empty; ``cluster_time`` is ``{"t": T, "i": I}``; an absent field
takes the protobuf default. Blank lines are skipped. For example::

    {"event_id": "ev-1", "database": "app", "mgo_coll": "messages",
     "mgo_doc_id": "m-1", "op_type": "insert", "full_doc": {"_id": "m-1"},
     "timestamp": 1700000000000}

(on one line). A line that is not such an object is logged with its line
number, counted in ``ReplaySource.skipped`` and skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import orjson

from streamer.errors import StreamerError
from streamer.protocol.puller_v1_pb2 import ChangeEvent, ClusterTime
from streamer.tools.workload import Workload, change_event

log = logging.getLogger(__name__)

Emit = Callable[[Sequence[tuple[ChangeEvent, bytes]]], Awaitable[None]]
MAX_BATCH = 1024  # events handed to emit at once
TICK = 0.002  # seconds between two batches of a paced source

_STRINGS = ("event_id", "database", "mgo_coll", "mgo_doc_id", "op_type", "backend")
_INTS = ("timestamp", "txn_number")
_JSON = ("full_doc", "update_desc", "before_doc")
FIELDS = frozenset((*_STRINGS, *_INTS, *_JSON, "cluster_time"))


class Source(Protocol):
    async def run(
        self,
        emit: Callable[[Sequence[tuple[ChangeEvent, bytes]]], Awaitable[None]],
        resume: bytes | None,
    ) -> None: ...


class ReplayLineError(StreamerError, ValueError):
    """A replay-file line that is not a change event; the message says why."""


def to_json_line(event: ChangeEvent) -> bytes:
    """One replay-file line (with its newline) for ``event``."""
    entry: dict[str, Any] = {}
    for name in _STRINGS + _INTS:
        value = getattr(event, name)
        if value:
            entry[name] = value
    for name in _JSON:
        raw = getattr(event, name)
        if raw:
            # The event's JSON bytes as they are, not re-encoded.
            entry[name] = orjson.Fragment(raw)
    if event.HasField("cluster_time"):
        entry["cluster_time"] = {"t": event.cluster_time.t, "i": event.cluster_time.i}
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)


def from_json_line(line: bytes | str) -> ChangeEvent:
    """The change event of one replay-file line (raises ReplayLineError)."""
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ReplayLineError(f"not JSON ({exc})") from None
    if not isinstance(entry, dict):
        raise ReplayLineError(f"not a JSON object but {type(entry).__name__}")
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise ReplayLineError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    event = ChangeEvent()
    for name in _STRINGS:
        value = entry.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ReplayLineError(f"{name!r} must be a string, not {type(value).__name__}")
            setattr(event, name, value)
    for name in _INTS:
        value = entry.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or not (
                -(1 << 63) <= value < 1 << 63
            ):
                raise ReplayLineError(f"{name!r} must be a 64-bit integer, not {value!r}")
            setattr(event, name, value)
    for name in _JSON:
        value = entry.get(name)
        if value is not None:
            setattr(event, name, orjson.dumps(value))
    cluster_time = entry.get("cluster_time")
    if cluster_time is not None:
        if not isinstance(cluster_time, dict) or set(cluster_time) - {"t", "i"} or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32
            for v in cluster_time.values()
        ):
            raise ReplayLineError(
                f"'cluster_time' must be {{\"t\": uint32, \"i\": uint32}}, not {cluster_time!r}"
            )
        event.cluster_time.CopyFrom(ClusterTime(**cluster_time))
    return event


class Recorder:
    """Writes every event a source emits to a replay file (``--record``),
    after the log has made it durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "ab")
        self.recorded = 0

    def wrap(self, emit: Emit) -> Emit:
        async def recording(batch: Sequence[tuple[ChangeEvent, bytes]]) -> None:
            try:
                await emit(batch)
            except asyncio.CancelledError:
                # Shutdown cancels the source mid-append, but the append
                # itself is shielded and completes: the batch is in the log,
                # so it belongs in the recording too.
                self._write(batch)
                raise
            self._write(batch)

        return recording

    def _write(self, batch: Sequence[tuple[ChangeEvent, bytes]]) -> None:
        self._file.write(b"".join(to_json_line(event) for event, _ in batch))
        self._file.flush()
        self.recorded += len(batch)

    def close(self) -> None:
        self._file.close()


async def _paced(
    events: Iterator[tuple[ChangeEvent, bytes]], emit: Emit, rate: float | None
) -> None:
    """Emit ``events`` at ``rate`` per second (None: as fast as the log
    takes them), a batch of whatever is due every TICK seconds.

    The ticks are a fixed cadence: emitting as soon as one event is due
    would send many tiny batches, and every batch costs a log append and a
    message to each consumer. A tick missed (the process was busy) is not
    made up with a burst of ticks: the next batch takes everything due.
    """
    start = tick = time.monotonic()
    emitted = 0
    while True:
        if rate is None:
            due = MAX_BATCH
        else:
            now = time.monotonic()
            if now < tick:
                await asyncio.sleep(tick - now)
                now = time.monotonic()
            tick = max(tick, now) + TICK
            due = min(int((now - start) * rate) - emitted, MAX_BATCH)
            if due <= 0:
                continue
        batch = list(itertools.islice(events, due))
        if batch:
            await emit(batch)
            emitted += len(batch)
        if len(batch) < due:
            return
        if rate is None:
            await asyncio.sleep(0)  # let consumers run between batches


class WorkloadSource:
    """The seeded chat workload (``streamer.tools.workload``) at a steady rate.

    ``source_state`` is ``chat:<seed>:<count>``, the number of events of the
    seeded stream emitted so far; on resume the stream continues after them
    (regenerating the skipped prefix).
    """

    def __init__(
        self, rate: float, seed: int = 1, n_subscriptions: int = 100_000, *,
        stamp_event_ids: bool = False, cycle: int = 0,
    ) -> None:
        self.rate = rate
        self.seed = seed
        # A benchmarking aid (``--stamp-event-ids``): event ids become
        # ``ev-<index>-<emit time, ns since the epoch>``, so a gateway can
        # measure Puller→gateway latency finer than ChangeEvent.timestamp's
        # milliseconds. Event ids are opaque to the Streamer and gateways.
        self.stamp_event_ids = stamp_event_ids
        # Another benchmarking aid (``--cycle K``): generate the first K
        # events of the seeded stream once and repeat them (new ids and
        # timestamps, same documents), so that a Puller offering tens of
        # thousands of events per second does not spend its core generating
        # them.
        self.cycle = cycle
        self.workload = Workload(n_subscriptions, seed=seed)

    def _start(self, resume: bytes | None) -> int:
        if resume is None:
            return 0
        parts = resume.decode(errors="replace").split(":")
        if len(parts) == 3 and parts[:2] == ["chat", str(self.seed)] and parts[2].isdigit():
            return int(parts[2])
        log.warning(
            "the log was written by another source (state %r); the chat workload "
            "with seed %d starts from its beginning", resume[:80], self.seed,
        )
        return 0

    async def run(self, emit: Emit, resume: bytes | None) -> None:
        start = self._start(resume)
        if start:
            log.info("workload: continuing after event %d of seed %d", start, self.seed)
        if self.cycle > 0:
            pool = [change_event(spec, i) for i, spec in enumerate(
                self.workload.events(self.cycle))]
            specs: Iterator[Any] = iter(())
        else:
            specs = itertools.islice(self.workload.events(sys.maxsize), start, None)

        def pooled() -> Iterator[tuple[ChangeEvent, bytes]]:
            size = len(pool)
            for index in itertools.count(start):
                event = ChangeEvent()
                event.CopyFrom(pool[index % size])
                yield event, f"chat:{self.seed}:{index + 1}".encode()

        def generated() -> Iterator[tuple[ChangeEvent, bytes]]:
            for index, spec in enumerate(specs, start):
                yield change_event(spec, index), f"chat:{self.seed}:{index + 1}".encode()

        def events() -> Iterator[tuple[ChangeEvent, bytes]]:
            # Stamped when emitted: the generator runs as each batch is due.
            stamp = self.stamp_event_ids
            index = start
            for event, state in pooled() if self.cycle > 0 else generated():
                now = time.time_ns()
                event.timestamp = now // 1_000_000
                event.event_id = f"ev-{index}-{now}" if stamp else f"ev-{index}"
                index += 1
                yield event, state

        await _paced(events(), emit, self.rate)


class ReplaySource:
    """The change events of a replay file, in order, at ``rate`` per second
    (None: as fast as the log takes them).

    ``source_state`` is ``replay:<line number>`` of the event; on resume the
    file continues after that line, so a restart does not replay it twice.
    """

    def __init__(self, path: Path, rate: float | None = None) -> None:
        self.path = path
        self.rate = rate
        self.skipped = 0

    def _lines(self, after_line: int) -> Iterator[tuple[ChangeEvent, bytes]]:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if number <= after_line or not line.strip():
                    continue
                try:
                    event = from_json_line(line)
                except ReplayLineError as exc:
                    self.skipped += 1
                    log.error("%s:%d: skipped: %s", self.path, number, exc)
                    continue
                yield event, f"replay:{number}".encode()

    async def run(self, emit: Emit, resume: bytes | None) -> None:
        after_line = 0
        if resume is not None:
            kind, _, line = resume.decode(errors="replace").partition(":")
            if kind == "replay" and line.isdigit():
                after_line = int(line)
                log.info("replay: continuing after line %d of %s", after_line, self.path)
            else:
                log.warning(
                    "the log was written by another source (state %r); replaying %s "
                    "from its first line", resume[:80], self.path,
                )
        await _paced(self._lines(after_line), emit, self.rate)
        log.info("replay of %s finished (%d line(s) skipped)", self.path, self.skipped)
