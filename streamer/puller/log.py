"""The Puller's durable replay log: positions, markers, segments, retention.

Every appended change event gets the next position (1, 2, ...; 0 means
"before the first event"). A marker names a position in one log,
``v1:<log id>:<position>``; clients treat it as opaque. The log id is drawn
when the directory is first used (file ``LOG_ID``), so a marker from another
or a wiped log is refused instead of silently meaning something else.

On disk the log is a directory of append-only segment files. The one being
written is ``<first position>.seg`` (20 digits); when it grows past
``segment_bytes`` or gets older than ``segment_age`` it is sealed by renaming
it ``<first>-<last>-<last append, ms>.seg``, so that opening the log and
applying retention need no scan of sealed segments. A record is::

    u32 length | u32 crc32 | u64 position | f64 append time | payload
    payload = u32 len(source_state) | source_state | serialized ChangeEvent

little-endian, the CRC covering everything after it. ``append`` writes a
whole batch with one ``write`` and one ``fsync`` (group commit): an event is
acknowledged once ``append`` returns. The directory belongs to one process
at a time (``streamer.locking``: a second one is refused with
``DirectoryInUse``). On open, the active segment is scanned and a torn or
corrupt tail (a crash mid-write, garbage) is cut off at the first bad
record; everything before it is kept.

Retention drops whole sealed segments, oldest first, while the log holds more
than ``max_bytes`` or while a segment's newest record is older than
``max_age`` seconds; the active segment is never dropped. Reads go through a
small in-memory cache of the newest records (what live consumers ask for)
and otherwise through a sparse per-segment offset index built on first use,
so memory stays bounded whatever the log's size.

The log is thread-safe: the server appends and reads off the event loop.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from streamer.errors import StreamerError
from streamer.locking import DirectoryLock
from streamer.protocol.puller_v1_pb2 import ChangeEvent
from streamer.wire import MAX_EVENT_BYTES

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQd")
STATE_LEN = struct.Struct("<I")
# A length beyond this is garbage, not a record: no event above
# MAX_EVENT_BYTES is ever appended.
MAX_RECORD = 64 << 20
INDEX_EVERY = 128  # one (position, offset) pair per this many records
CACHE_RECORDS = 8192
READ_CHUNK = 1 << 20  # bytes read at a time when catching up from disk
MARKER_VERSION = "v1"
_ACTIVE = re.compile(r"^(\d{20})\.seg$")
_SEALED = re.compile(r"^(\d{20})-(\d{20})-(\d+)\.seg$")


class MarkerError(StreamerError, ValueError):
    """A marker the log cannot resume after (malformed, from another log,
    older than retention, or beyond the last event); the message says which."""


class MarkerExpired(MarkerError):
    """The marker's position was dropped by retention."""


class LogError(StreamerError, OSError):
    """The log directory holds something that is not a replay log."""


class Record:
    """One logged change event. ``data`` is the serialized ``ChangeEvent``,
    as stored and as forwarded; ``event`` decodes it on first use."""

    __slots__ = ("_event", "appended", "data", "position", "source_state", "wire")

    def __init__(
        self, position: int, appended: float, data: bytes, source_state: bytes,
        event: ChangeEvent | None = None,
    ) -> None:
        self.position = position
        self.appended = appended  # wall-clock seconds (the log's clock)
        self.data = data
        self.source_state = source_state
        # The server's wire form of this record, made once for all consumers.
        self.wire: bytes | None = None
        self._event = event

    @property
    def event(self) -> ChangeEvent:
        if self._event is None:
            self._event = ChangeEvent.FromString(self.data)
        return self._event


@dataclass(slots=True)
class _Segment:
    first: int  # position of its first record (it may have none yet)
    last: int  # position of its last record; first - 1 when empty
    last_appended: float  # append time of its newest record (0 when empty)
    path: Path
    size: int
    started: float = 0.0  # append time of its first record (active segment only)
    # Sparse (position, offset) pairs, ascending; None until first needed.
    index: list[tuple[int, int]] | None = field(default=None)


def _encode(position: int, appended: float, data: bytes, state: bytes) -> bytes:
    payload = STATE_LEN.pack(len(state)) + state + data
    tail = struct.pack("<Qd", position, appended) + payload
    return struct.pack("<II", len(payload), zlib.crc32(tail)) + tail


def _scan(data: bytes, first: int) -> tuple[list[tuple[int, int, float]], int]:
    """(position, offset, append time) of the valid records of a segment's
    bytes, in order, and the offset where valid data ends."""
    out: list[tuple[int, int, float]] = []
    offset, expected, end = 0, first, len(data)
    while offset + HEADER.size <= end:
        length, crc, position, appended = HEADER.unpack_from(data, offset)
        stop = offset + HEADER.size + length
        if (
            length > MAX_RECORD or stop > end or position != expected
            or zlib.crc32(data[offset + 8 : stop]) != crc
        ):
            break
        out.append((position, offset, appended))
        offset, expected = stop, expected + 1
    return out, offset


def _decode(data: bytes, offset: int) -> tuple[Record, int]:
    length, _, position, appended = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    (state_len,) = STATE_LEN.unpack_from(data, start)
    state_end = start + STATE_LEN.size + state_len
    record = Record(
        position, appended, data[state_end : start + length],
        data[start + STATE_LEN.size : state_end],
    )
    return record, start + length


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReplayLog:
    """An append-only, durable, retained log of change events (module docstring)."""

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 1 << 30,
        max_age: float = 3600.0,
        segment_bytes: int | None = None,
        segment_age: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_age = max_age
        # Segments a fraction of the retention, so retention frees space in
        # steps of about an eighth rather than all at once.
        self.segment_bytes = segment_bytes or max(4096, min(64 << 20, max_bytes // 8))
        self.segment_age = segment_age if segment_age is not None else max_age / 8
        self.clock = clock
        self._lock = threading.Lock()  # guards the in-memory state
        self._append_lock = threading.Lock()  # one writer at a time
        self._cache: deque[Record] = deque(maxlen=CACHE_RECORDS)
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # _segments' first positions, for bisect
        self.oversized = 0  # events refused by append for their size
        self.directory.mkdir(parents=True, exist_ok=True)
        # Before anything is read: recovery cuts what it takes for a torn
        # tail, which another process's append in flight would look like.
        self._dir_lock = DirectoryLock(self.directory)
        self._dir_lock.acquire()
        try:
            self.log_id = self._load_id()
            self._open_segments()
            self._out: BinaryIO = open(self._segments[-1].path, "ab")
            self._enforce_retention()
        except BaseException:
            self._dir_lock.release()
            raise

    # -- opening ---------------------------------------------------------

    def _load_id(self) -> str:
        path = self.directory / "LOG_ID"
        try:
            log_id = path.read_text().strip()
        except FileNotFoundError:
            log_id = secrets.token_hex(6)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(log_id + "\n")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.directory)
            return log_id
        if not re.fullmatch(r"[0-9a-f]{12}", log_id):
            raise LogError(f"{path}: not a replay log id: {log_id[:40]!r}")
        return log_id

    def _open_segments(self) -> None:
        segments: list[_Segment] = []
        for path in self.directory.iterdir():
            if m := _SEALED.match(path.name):
                first, last, ms = int(m[1]), int(m[2]), int(m[3])
                segments.append(_Segment(first, last, ms / 1000, path, path.stat().st_size))
            elif m := _ACTIVE.match(path.name):
                segments.append(self._recover(path, int(m[1])))
        segments.sort(key=lambda s: s.first)
        for older, newer in itertools.pairwise(segments):
            if older.last + 1 != newer.first:
                raise LogError(
                    f"{self.directory}: segments {older.path.name} and {newer.path.name} "
                    f"are not contiguous (positions {older.last} then {newer.first})"
                )
        # Only the newest segment may stay active; an older one left active
        # (a crash between sealing steps) is sealed now.
        for i, segment in enumerate(segments[:-1]):
            if _ACTIVE.match(segment.path.name):
                segments[i] = self._seal(segment)
        if not segments or not _ACTIVE.match(segments[-1].path.name):
            first = segments[-1].last + 1 if segments else 1
            segments.append(self._create(first))
        self._segments = segments
        self._firsts = [s.first for s in segments]
        self._fill_cache()

    def _recover(self, path: Path, first: int) -> _Segment:
        """Scan an active segment, cutting off a torn or corrupt tail."""
        data = path.read_bytes()
        records, end = _scan(data, first)
        if end < len(data):
            log.warning(
                "%s: cut %d byte(s) of torn or corrupt tail at offset %d (after position %d)",
                path, len(data) - end, end, records[-1][0] if records else first - 1,
            )
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        index = [(p, o) for k, (p, o, _) in enumerate(records) if k % INDEX_EVERY == 0]
        last_appended = records[-1][2] if records else 0.0
        started = records[0][2] if records else 0.0
        return _Segment(first, first + len(records) - 1, last_appended, path, end, started, index)

    def _create(self, first: int) -> _Segment:
        path = self.directory / f"{first:020d}.seg"
        path.touch()
        _fsync_dir(self.directory)
        return _Segment(first, first - 1, 0.0, path, 0, 0.0, [])

    def _seal(self, segment: _Segment) -> _Segment:
        name = f"{segment.first:020d}-{segment.last:020d}-{round(segment.last_appended * 1000)}"
        path = segment.path.with_name(name + ".seg")
        os.replace(segment.path, path)
        _fsync_dir(self.directory)
        segment.path = path
        return segment

    def _fill_cache(self) -> None:
        active = self._segments[-1]
        if active.last >= active.first:
            data = active.path.read_bytes()
            offset = 0
            while offset < len(data):
                record, offset = _decode(data, offset)
                self._cache.append(record)

    # -- positions and markers ------------------------------------------

    @property
    def first_position(self) -> int:
        """The oldest position still held (``last_position + 1`` when empty)."""
        with self._lock:
            return self._segments[0].first

    @property
    def last_position(self) -> int:
        """The newest acknowledged position (0 before the first append)."""
        with self._lock:
            return self._segments[-1].last

    def marker(self, position: int) -> str:
        """The opaque marker of ``position`` (the point after that event)."""
        return f"{MARKER_VERSION}:{self.log_id}:{position}"

    def position(self, marker: str) -> int:
        """The position a marker names, if the log can resume after it.

        Raises :class:`MarkerError` (or :class:`MarkerExpired`) saying why not.
        """
        parts = marker.split(":")
        if len(parts) != 3 or parts[0] != MARKER_VERSION or not parts[2].isdigit():
            raise MarkerError(f"marker {marker!r} is not a marker of this Puller")
        if parts[1] != self.log_id:
            raise MarkerError(
                f"marker {marker!r} is from another replay log (this one is {self.log_id}); "
                "resume from the live head"
            )
        position = int(parts[2])
        with self._lock:
            first, last = self._segments[0].first, self._segments[-1].last
        if position > last:
            raise MarkerError(
                f"marker {marker!r} is beyond the last event of the log (position {last})"
            )
        if position < first - 1:
            raise MarkerExpired(
                f"marker {marker!r} is older than the log's retention "
                f"(oldest position kept: {first}); events after it are lost"
            )
        return position

    def last_source_state(self) -> bytes | None:
        """The ``source_state`` of the newest event (None when the log is empty)."""
        with self._lock:
            if self._cache:
                return self._cache[-1].source_state
            last = self._segments[-1].last
        if last == 0:
            return None
        records = self.read(last - 1, 1)
        return records[0].source_state if records else None

    # -- appending -------------------------------------------------------

    def append(self, batch: Sequence[tuple[ChangeEvent, bytes]]) -> int:
        """Append ``(event, source_state)`` pairs durably (one fsync for the
        batch); the position of the last one once it is on disk."""
        with self._append_lock:
            now = self.clock()
            active = self._segments[-1]
            if active.size and (
                active.size >= self.segment_bytes
                or now - active.started >= self.segment_age
            ):
                active = self._roll(now)
            position = active.last
            records: list[Record] = []
            chunks: list[bytes] = []
            offsets: list[tuple[int, int]] = []
            offset = active.size
            for event, state in batch:
                data = event.SerializeToString()
                if len(data) > MAX_EVENT_BYTES:
                    # No consumer could receive it, and a record this large
                    # would read back as garbage: refused here, loudly.
                    self.oversized += 1
                    log.error(
                        "event %s of %s.%s is %d bytes serialized; the limit is %d: not logged",
                        event.event_id, event.database, event.mgo_coll, len(data),
                        MAX_EVENT_BYTES,
                    )
                    continue
                position += 1
                chunk = _encode(position, now, data, state)
                if (position - active.first) % INDEX_EVERY == 0:
                    offsets.append((position, offset))
                offset += len(chunk)
                chunks.append(chunk)
                records.append(Record(position, now, data, bytes(state), event))
            if not records:
                return active.last
            self._out.write(b"".join(chunks))
            self._out.flush()
            os.fsync(self._out.fileno())
            with self._lock:
                active.size = offset
                active.last = position
                active.last_appended = now
                active.started = active.started or now
                if active.index is not None:
                    active.index.extend(offsets)
                self._cache.extend(records)
            self._enforce_retention(now)
            return position

    def _roll(self, now: float) -> _Segment:
        active = self._segments[-1]
        self._out.close()
        with self._lock:
            self._seal(active)
        new = self._create(active.last + 1)
        self._out = open(new.path, "ab")
        with self._lock:
            self._segments.append(new)
            self._firsts.append(new.first)
        return new

    def _enforce_retention(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        dropped: list[_Segment] = []
        with self._lock:
            total = sum(s.size for s in self._segments)
            while len(self._segments) > 1:
                oldest = self._segments[0]
                if total <= self.max_bytes and now - oldest.last_appended <= self.max_age:
                    break
                total -= oldest.size
                dropped.append(self._segments.pop(0))
                self._firsts.pop(0)
        for segment in dropped:
            log.info(
                "retention: dropped %s (positions %d-%d)",
                segment.path.name, segment.first, segment.last,
            )
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()

    def close(self) -> None:
        """Wait for an append in flight, then close the file."""
        with self._append_lock:
            self._out.close()
            self._dir_lock.release()

    # -- reading ---------------------------------------------------------

    def read_cached(
        self, after: int, limit: int, max_bytes: int = MAX_RECORD
    ) -> list[Record] | None:
        """Up to ``limit`` records after position ``after`` (and no more
        than ``max_bytes`` of events, but at least one) if the memory cache
        holds them (or there are none yet); None if the disk is needed.
        Raises :class:`MarkerExpired` if retention dropped them."""
        with self._lock:
            self._check_retained(after)
            cache = self._cache
            if not cache or after >= cache[-1].position:
                return [] if after >= self._segments[-1].last else None
            start = after + 1 - cache[0].position
            if start < 0:
                return None
            out: list[Record] = []
            size = 0
            for i in range(start, min(start + limit, len(cache))):
                size += len(cache[i].data)
                if out and size > max_bytes:
                    break
                out.append(cache[i])
            return out

    def _check_retained(self, after: int) -> None:
        first = self._segments[0].first
        if after < first - 1:
            raise MarkerExpired(
                f"position {after} is older than the log's retention "
                f"(oldest position kept: {first}); events after it are lost"
            )

    def read(self, after: int, limit: int, max_bytes: int = MAX_RECORD) -> list[Record]:
        """Up to ``limit`` records after position ``after``, no more than
        ``max_bytes`` of events but at least one (raises
        :class:`MarkerExpired` if retention dropped them)."""
        cached = self.read_cached(after, limit, max_bytes)
        if cached is not None:
            return cached
        records: list[Record] = []
        size = 0
        while len(records) < limit and size < max_bytes:
            with self._lock:
                self._check_retained(after)
                if after >= self._segments[-1].last:
                    break
                segment = self._segments[bisect.bisect_right(self._firsts, after + 1) - 1]
                last, size, path = segment.last, segment.size, segment.path
            try:
                found = self._read_segment(
                    segment, path, size, last, after, limit - len(records),
                    max_bytes - size if records else max_bytes,
                )
            except FileNotFoundError:
                continue  # sealed or dropped meanwhile: look again
            if not found:
                break
            records.extend(found)
            size += sum(len(r.data) for r in found)
            after = found[-1].position
        return records

    def _read_segment(
        self, segment: _Segment, path: Path, size: int, last: int, after: int, limit: int,
        max_bytes: int,
    ) -> list[Record]:
        with open(path, "rb") as f:
            index = self._index(segment, f, size)
            k = bisect.bisect_right(index, (after + 1, size)) - 1
            offset = index[k][1] if k >= 0 else 0
            records: list[Record] = []
            taken = 0
            while offset < size and len(records) < limit and taken < max_bytes:
                f.seek(offset)
                # A chunk of whole records (at least the next one).
                data = f.read(min(size - offset, READ_CHUNK))
                (length,) = STATE_LEN.unpack_from(data, 0)
                if HEADER.size + length > len(data):
                    data += f.read(HEADER.size + length - len(data))
                at = 0
                while at + HEADER.size <= len(data) and len(records) < limit:
                    (length,) = STATE_LEN.unpack_from(data, at)
                    if at + HEADER.size + length > len(data):
                        break
                    record, next_at = _decode(data, at)
                    if record.position > last:
                        return records  # written by an append not yet acknowledged
                    if record.position > after:
                        if records and taken + len(record.data) > max_bytes:
                            return records
                        records.append(record)
                        taken += len(record.data)
                    at = next_at
                offset += at
            return records

    def _index(self, segment: _Segment, f: BinaryIO, size: int) -> list[tuple[int, int]]:
        with self._lock:
            if segment.index is not None:
                return list(segment.index)
        records, _ = _scan(f.read(size), segment.first)
        index = [(p, o) for k, (p, o, _) in enumerate(records) if k % INDEX_EVERY == 0]
        with self._lock:
            if segment.index is None:
                segment.index = index
        return index
