"""The pause log: event loop lag and garbage collections."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from streamer.node.pauses import PauseMonitor


def test_a_held_loop_is_measured_and_logged_with_its_collections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> PauseMonitor:
        monitor = PauseMonitor(period=0.01, log_above=0.1)
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # holds the loop, as a long batch would
        await asyncio.sleep(0.05)
        gc.collect()
        time.sleep(0.12)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return monitor

    with caplog.at_level(logging.WARNING, logger="streamer.node.pauses"):
        monitor = asyncio.run(main())
    assert 0.15 <= monitor.longest < 1.0
    assert monitor.lag.count > 10
    assert monitor.gc_pauses[2].count >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("the event loop was held for ")
    assert messages[0].endswith("no garbage collection in it")
    assert "garbage collection(s) (generations 2" in messages[1]
    assert gc.callbacks.count(monitor._on_gc) == 0  # removed when the task ends
