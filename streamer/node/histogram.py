"""Fixed-bucket histograms cheap enough for the hot path (the ingest
latency, the pause log); ``streamer.node.metrics`` exports them at scrape
time."""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def decades(first: int, last: int) -> tuple[float, ...]:
    """Bucket bounds from 10**first to 10**last, ten per decade (the R10
    series): a quantile interpolated inside a bucket is off by less than one
    bucket width (at most 27 %)."""
    return (
        *(
            round(m * 10.0**e, 12)
            for e in range(first, last)
            for m in (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
        ),
        10.0**last,
    )


# 1 µs to 100 ms.
LATENCY_BUCKETS = decades(-6, -1)


class LatencyHistogram:
    """A fixed-bucket histogram cheap enough for the ingest hot path.

    ``observe`` is one bisection over the bucket bounds, one list increment and
    one float addition; the cumulative form Prometheus wants is built only at
    scrape time. A value equal to a bound falls in that bound's bucket
    (Prometheus ``le``).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` observations of ``seconds`` each."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += count
        self.sum += seconds * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``, and the sum."""
        counts, total = list(self.counts), self.sum
        buckets = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, float(running)))
        return buckets, total
