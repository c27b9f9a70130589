"""Durable progress: atomic files, batched writes, nothing pending left behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from service_helpers import until

from streamer.locking import DirectoryInUse
from streamer.node.progress import ProgressFileError, ProgressStore, SavedProgress
from streamer.node.sessions import KnownGateways


def test_fresh_state_dir_has_no_progress(tmp_path: Path) -> None:
    assert ProgressStore(tmp_path / "new").load() == SavedProgress()


def test_roundtrip_and_no_temporary_file_left(tmp_path: Path) -> None:
    async def main() -> None:
        store = ProgressStore(tmp_path)
        store.set_gateways(KnownGateways(frozenset({"gw-1", "gw-0"}), 2))
        store.advance("m-1")
        await store.flush()

    asyncio.run(main())
    assert os.listdir(tmp_path) == ["progress.json"]
    assert ProgressStore(tmp_path).load() == SavedProgress(
        "m-1", KnownGateways(frozenset({"gw-0", "gw-1"}), 2))


def test_a_change_of_gateways_alone_is_written(tmp_path: Path) -> None:
    async def main() -> None:
        store = ProgressStore(tmp_path, interval=0.01)
        task = asyncio.create_task(store.run())
        store.set_gateways(KnownGateways(frozenset({"gw-0"}), 0))
        await until(lambda: store.writes == 1)
        task.cancel()

    asyncio.run(main())
    assert ProgressStore(tmp_path).load().gateways.ids == {"gw-0"}


def test_pending_marker_is_written_without_further_events(tmp_path: Path) -> None:
    async def main() -> int:
        store = ProgressStore(tmp_path, interval=0.05)
        task = asyncio.create_task(store.run())
        for i in range(10):
            store.advance(f"m-{i}")
        await until(lambda: store.writes > 0)
        await asyncio.sleep(0.2)  # room for a wrong second write to show up
        task.cancel()
        return store.writes

    # Ten advances within one interval are one write, and it is the last.
    assert asyncio.run(main()) == 1
    assert ProgressStore(tmp_path).load().marker == "m-9"


def test_a_full_batch_is_written_at_once(tmp_path: Path) -> None:
    async def main() -> int:
        # An interval no test run reaches: only the batch size can trigger.
        store = ProgressStore(tmp_path, interval=3600, batch=1000)
        task = asyncio.create_task(store.run())
        for i in range(2500):
            store.advance(f"m-{i}")
        await until(lambda: store.writes == 1)
        task.cancel()
        return store.writes

    assert asyncio.run(main()) == 1
    assert ProgressStore(tmp_path).load().marker == "m-2499"


def test_the_writer_stops_when_cancelled_as_a_batch_fills(tmp_path: Path) -> None:
    """The node stops its tasks by cancelling them. A cancellation that
    lands as the writer wakes up for a full batch must end it: on Python
    3.11, ``asyncio.wait_for`` swallowed it (it returns the wait's result
    when that completed meanwhile), the writer went back to waiting for
    the next marker, and ``StreamerNode.stop`` waited for it forever."""

    async def main() -> None:
        store = ProgressStore(tmp_path, interval=3600, batch=2)
        task = asyncio.create_task(store.run())
        store.advance("m-1")
        await asyncio.sleep(0.01)  # the writer now waits for the batch to fill
        store.advance("m-2")  # the batch is full: the writer is woken...
        task.cancel()  # ... and cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(2):
                await task

    asyncio.run(main())


def test_repeated_marker_is_not_a_write(tmp_path: Path) -> None:
    async def main() -> int:
        store = ProgressStore(tmp_path)
        store.advance("m-1")
        await store.flush()
        store.advance("m-1")
        await store.flush()
        return store.writes

    assert asyncio.run(main()) == 1


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_bytes(b"{not json")
    with pytest.raises(ProgressFileError, match=r"progress\.json: not a progress file"):
        ProgressStore(tmp_path).load()


def test_failed_write_keeps_the_marker_pending(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> ProgressStore:
        store = ProgressStore(blocker / "state")
        store.advance("m-1")
        with pytest.raises(OSError):
            await store.flush()
        store.path = tmp_path / "progress.json"
        await store.flush()
        return store

    assert asyncio.run(main()).writes == 1
    assert ProgressStore(tmp_path).load().marker == "m-1"


def test_an_empty_marker_is_refused_and_counted(tmp_path: Path) -> None:
    async def main() -> None:
        store = ProgressStore(tmp_path)
        store.advance("m-1")
        store.advance("")
        assert (store.marker, store.empty_markers) == ("m-1", 1)
        await store.flush()

    asyncio.run(main())
    assert ProgressStore(tmp_path).load().marker == "m-1"


def test_a_final_flush_after_cancelling_a_write_in_flight_writes_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the writer task while its write runs in a thread;
    the final flush must neither collide with that write (one temporary
    file) nor skip its marker."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a busy disk
        time.sleep(0.2)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def main() -> None:
        store = ProgressStore(tmp_path, interval=0.01)
        task = asyncio.create_task(store.run())
        store.advance("m-1")
        await asyncio.sleep(0.1)  # the write of m-1 is in its fsync now
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.set_gateways(KnownGateways(frozenset({"gw-0"}), 0))
        await store.flush()

    asyncio.run(main())
    assert sorted(os.listdir(tmp_path)) == ["progress.json"]
    saved = ProgressStore(tmp_path).load()
    assert (saved.marker, saved.gateways.ids) == ("m-1", {"gw-0"})


def test_open_takes_the_directory_for_one_store(tmp_path: Path) -> None:
    first = ProgressStore(tmp_path)
    assert first.open() == SavedProgress()
    try:
        with pytest.raises(DirectoryInUse, match=f"{tmp_path} is in use by another process"):
            ProgressStore(tmp_path).open()
    finally:
        first.close()
    second = ProgressStore(tmp_path)
    second.open()
    second.close()
