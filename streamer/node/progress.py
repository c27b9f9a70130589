"""Durable ingest progress: the Puller marker and the gateways known with it.

The ingest loop calls ``advance`` for every event it has fully matched and
enqueued (and for heartbeats); a background task persists the latest marker
to ``<state_dir>/progress.json`` by atomic replace. Writes are batched: one
per ``interval`` (100 ms) unless ``batch`` (1000) advances pile up first, and
a pending marker is written no later than ``interval`` after it advanced,
even if nothing else arrives. ``flush`` writes at once (shutdown).

``open`` takes the state directory for this process (``streamer.locking``)
and proves it writable before the service starts; ``close`` gives it back.

The file also keeps the gateways connected when it was written
(``KnownGateways``), so that the next start can wait for them to
re-register before the replay (``streamer.node.sessions.RestartWindow``); a
change to them is written like an advance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from streamer.errors import StreamerError
from streamer.locking import DirectoryInUse, DirectoryLock
from streamer.node.sessions import KnownGateways

FILE_NAME = "progress.json"
log = logging.getLogger(__name__)


class ProgressFileError(StreamerError, ValueError):
    """The progress file exists but cannot be read back."""


class StateDirError(StreamerError, OSError):
    """The state directory cannot be used (not a directory, not writable)."""


@dataclass(frozen=True, slots=True)
class SavedProgress:
    marker: str = ""
    gateways: KnownGateways = field(default_factory=KnownGateways)


class ProgressStore:
    """Latest marker in memory, persisted in batches by ``run()``."""

    def __init__(self, state_dir: Path, *, interval: float = 0.1, batch: int = 1000) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.interval = interval
        self.batch = batch
        self.marker = ""
        self.gateways = KnownGateways()
        self.writes = 0
        self.write_errors = 0
        self.empty_markers = 0
        self.advanced_at = time.monotonic()  # when the marker last changed
        self._dirty = 0  # advances since the last write
        self._since = 0.0  # loop time of the first unwritten advance
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._dir_lock = DirectoryLock(self.path.parent)
        # Held by the thread that writes: a write abandoned by a cancelled
        # flush still runs, and the next one must not share its temporary file.
        self._write_lock = threading.Lock()

    def open(self) -> SavedProgress:
        """Take the state directory (created if missing; one process at a
        time: ``DirectoryInUse`` otherwise), check that a marker can be
        written there (``StateDirError``), and read the saved progress."""
        directory = self.path.parent
        if directory.exists() and not directory.is_dir():
            raise StateDirError(f"state directory {directory}: not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._dir_lock.acquire()
        except DirectoryInUse:
            raise
        except OSError as exc:
            raise StateDirError(f"state directory {directory}: {exc.strerror or exc}") from None
        try:
            saved = self.load()
            self._probe()
        except BaseException:
            self._dir_lock.release()
            raise
        return saved

    def close(self) -> None:
        """Give the state directory back (after the last ``flush``)."""
        self._dir_lock.release()

    def _probe(self) -> None:
        # The write path of every marker, minus the rename: a full disk or a
        # read-only mount is found now, not at the first event.
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"{}")
                os.fsync(f.fileno())
            tmp.unlink()
        except OSError as exc:
            raise StateDirError(f"cannot write {tmp}: {exc.strerror or exc}") from None

    def load(self) -> SavedProgress:
        """Read the saved progress (empty if there is none yet)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return SavedProgress()
        except OSError as exc:
            raise ProgressFileError(
                f"{self.path}: cannot read the progress file ({exc.strerror or exc}); move "
                "it away to start from the Puller's live head"
            ) from None
        try:
            data = orjson.loads(raw)
            known = KnownGateways(
                frozenset(map(str, data["gateways"])), int(data["others"]),
                frozenset((str(k), str(v)) for k, v in data.get("proofs", {}).items()),
            )
            saved = SavedProgress(str(data["marker"]), known)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ProgressFileError(
                f"{self.path}: not a progress file ({exc}); move it away to start from "
                "the Puller's live head"
            ) from None
        self.marker, self.gateways = saved.marker, saved.gateways
        return saved

    def advance(self, marker: str) -> None:
        """Record the marker of an event fully matched and enqueued. An
        empty marker is refused (counted, logged once): saved, it would mean
        "from the live head" at the next start, skipping everything between."""
        if marker == self.marker:
            return
        if not marker:
            self.empty_markers += 1
            if self.empty_markers == 1:
                log.warning("the Puller sent an empty progress marker; keeping %r "
                            "(counted in streamer_progress_empty_markers_total)", self.marker)
            return
        self.marker = marker
        self.advanced_at = time.monotonic()
        self._changed()

    def set_gateways(self, gateways: KnownGateways) -> None:
        """Record the connected gateways (written like an advance)."""
        if gateways != self.gateways:
            self.gateways = gateways
            self._changed()

    def _changed(self) -> None:
        if self._dirty == 0:
            self._since = asyncio.get_running_loop().time()
        self._dirty += 1
        if self._dirty == 1 or self._dirty >= self.batch:
            self._wake.set()

    async def run(self) -> None:
        """Persist pending markers until cancelled."""
        loop = asyncio.get_running_loop()
        quiet_until = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty and self._dirty < self.batch:
                remaining = self._since + self.interval - loop.time()
                if remaining <= 0:
                    break
                # Not asyncio.wait_for: on Python 3.11 it swallows a
                # cancellation that lands as the wait completes, and the
                # node's stop would wait for this task forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                self._wake.clear()
            if self._dirty:
                try:
                    await self.flush()
                except OSError as exc:
                    # Keep the marker pending and try again: progress only
                    # moves forward once it is on disk. A failing disk is
                    # logged when it starts failing and then every minute.
                    self.write_errors += 1
                    now = loop.time()
                    if now >= quiet_until:
                        log.error("cannot write %s: %s; retrying (%d failed writes so far)",
                                  self.path, exc, self.write_errors)
                        quiet_until = now + 60
                    await asyncio.sleep(min(self.interval * 10, 1.0))
                    self._wake.set()
                else:
                    quiet_until = 0.0

    async def flush(self) -> None:
        """Write the current marker now (off the event loop)."""
        async with self._lock:
            if not self._dirty:
                return
            dirty, self._dirty = self._dirty, 0
            known = self.gateways
            payload = orjson.dumps(
                {"marker": self.marker, "gateways": sorted(known.ids), "others": known.others,
                 "proofs": dict(sorted(known.proofs))}
            )
            try:
                await asyncio.to_thread(self._write, payload)
            except BaseException:
                # Failed, or cancelled (the thread may still finish): either
                # way the marker counts as unwritten until a flush succeeds.
                self._dirty += dirty
                raise
            self.writes += 1

    def _write(self, payload: bytes) -> None:
        # Write a sibling, fsync it, rename over the old file, fsync the
        # directory: a crash leaves either the old marker or the new one.
        with self._write_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
