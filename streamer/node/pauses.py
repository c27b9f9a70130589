"""How long the event loop is kept from running: the pause log.

Everything a node does runs on one event loop, so anything that holds it
(a long batch, a full garbage collection, blocking I/O by mistake) delays
every gateway at once. ``PauseMonitor`` measures it from the inside: a task
asks to wake every ``period`` seconds and records how late it wakes (the
loop's lag), and a ``gc`` callback times every collection. Lags and GC
pauses go into histograms (exported as metrics), and every lag longer than
``log_above`` is logged at WARNING with the collections that ran in it, so
a tail-latency spike can be traced to its cause.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from streamer.node.histogram import LatencyHistogram, decades

log = logging.getLogger(__name__)

# Pauses worth a histogram: 100 µs to 10 s.
PAUSE_BUCKETS = decades(-4, 1)


class PauseMonitor:
    """Loop lag and GC pauses of this process; ``run`` until cancelled."""

    def __init__(self, period: float = 0.01, log_above: float = 0.1) -> None:
        self.period = period
        self.log_above = log_above
        self.lag = LatencyHistogram(PAUSE_BUCKETS)
        self.gc_pauses = {generation: LatencyHistogram(PAUSE_BUCKETS) for generation in (0, 1, 2)}
        self.longest = 0.0
        self._gc_started = 0.0
        # Collections since the last wake-up: (generation, seconds).
        self._recent_gc: list[tuple[int, float]] = []

    async def run(self) -> None:
        clock = time.perf_counter
        gc.callbacks.append(self._on_gc)
        try:
            due = clock() + self.period
            while True:
                await asyncio.sleep(self.period)
                now = clock()
                late = max(now - due, 0.0)
                self.lag.observe(late)
                if late > self.longest:
                    self.longest = late
                if late > self.log_above:
                    self._log(late)
                self._recent_gc.clear()
                due = now + self.period
        finally:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        generation = int(info.get("generation", 2))
        self.gc_pauses[generation].observe(took)
        if len(self._recent_gc) < 16:
            self._recent_gc.append((generation, took))

    def _log(self, late: float) -> None:
        collections = sum(took for _, took in self._recent_gc)
        if self._recent_gc:
            cause = ", of which {:.0f} ms in {} garbage collection(s) (generations {})".format(
                collections * 1e3, len(self._recent_gc),
                ", ".join(str(g) for g, _ in self._recent_gc),
            )
        else:
            cause = ", no garbage collection in it"
        log.warning("the event loop was held for %.0f ms%s", late * 1e3, cause,
                    extra={"pause_ms": round(late * 1e3, 3),
                           "gc_ms": round(collections * 1e3, 3)})
