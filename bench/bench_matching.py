"""Matching benchmark: the subscription index under the reference workload.

Run (not part of ``pytest tests/``)::

    pytest bench/                                      # N = 100k and 1M (default)
    pytest bench/bench_matching.py                     # the same
    STREAMER_BENCH_SIZES=20000 pytest bench/           # quick mode, well under a minute

Environment (all optional):

- ``STREAMER_BENCH_SIZES``  comma-separated N (default ``100000,1000000``)
- ``STREAMER_BENCH_SEED``  workload seed (default 1)
- ``STREAMER_BENCH_EVENTS``  timed match calls per N (default 20000; 2000 more warm up first)
- ``STREAMER_BENCH_BASELINE_MAX_N``  largest N that gets the linear baseline (default 100000)
- ``STREAMER_BENCH_BASELINE_EVENTS`` / ``STREAMER_BENCH_BASELINE_SECONDS``  events for the
  linear baseline (default 200) and its time budget (default 120 s; at least 20 events run)

What is measured, per N, all in the same run, from the seeded workload of
``streamer.tools.workload``:

- ``match`` latency: every call of a stream of workload events (documents
  already decoded) timed with ``perf_counter_ns`` after a warm-up; p50, p99,
  p99.9, mean (the timer's own ~50 ns are included, not subtracted). GC
  collections during that loop are observed through ``gc.callbacks``. The
  same call is also registered with pytest-benchmark.
- ``add`` rate, separately for the structured-filter subscriptions and the
  CEL ones (arguments pre-built; the clock covers only the ``add`` calls),
  and ``remove`` rate (every subscription, in random order, at teardown).
  The pre-built arguments are the harness's own objects: they are moved to
  the GC's permanent generation (``gc.freeze``) while the adds run, so
  collections the matcher triggers do not also walk them, and released
  afterwards.
- Bytes per subscription and the worst full-collection pause: in a fresh
  interpreter (``PROBE_SCRIPT``; it imports only streamer and psutil) that
  streams the N subscriptions into a new ``Matcher``; RSS growth / N (ids
  included: each id is a fresh string the matcher keeps), then
  ``gc.collect()`` timed five times, the max reported. The same pause is also
  measured in this process, before and after loading.
- Linear baseline (N <= 100k): every subscription of the event's collection
  evaluated with cel-expr-python (Google's CEL C++ runtime; each subscription
  compiled once with ``disable_check=True``, structured filters translated to
  equivalent CEL, one ``Activation`` per event shared by all programs), against
  the index on the same events; the ratio is the smaller of the ratio of the
  means and of the p50s. The two must return the same ids for every event.

The table (beside the targets, PASS/MISS) is printed by ``bench/conftest.py``
at the end of the session and written to ``bench/results/matching.json``.
Most figures come from ordinary tests, not from the ``benchmark`` fixture, so
``--benchmark-disable`` keeps them all while ``--benchmark-only`` would skip
them. A full default run takes about four minutes on the 2-core machine (the
linear baseline alone ~75 s, the 1M loads most of the rest).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw.replace("_", "")) if raw else default


def _env_sizes() -> list[int]:
    raw = os.environ.get("STREAMER_BENCH_SIZES", "").strip() or "100000,1000000"
    sizes = sorted({int(float(x.replace("_", ""))) for x in raw.split(",") if x.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"STREAMER_BENCH_SIZES: bad value {raw!r}")
    return sizes


SIZES = _env_sizes()
SEED = _env_int("STREAMER_BENCH_SEED", 1)
EVENTS = _env_int("STREAMER_BENCH_EVENTS", 20_000)
WARMUP = 2_000
BASELINE_MAX_N = _env_int("STREAMER_BENCH_BASELINE_MAX_N", 100_000)
BASELINE_EVENTS = _env_int("STREAMER_BENCH_BASELINE_EVENTS", 200)
BASELINE_SECONDS = _env_int("STREAMER_BENCH_BASELINE_SECONDS", 120)
BASELINE_MIN_EVENTS = 20
GC_REPEATS = 5

EventTuple = tuple[str, str, str, dict[str, Any]]
AddArgs = tuple[str, str, str, list[Any], str | None]


# ------------------------------------------------------------------ helpers
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..1)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[k])


def full_gc_pauses_ms(repeats: int = GC_REPEATS) -> list[float]:
    pauses = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        gc.collect()
        pauses.append((time.perf_counter_ns() - t0) / 1e6)
    return pauses


class GcObserver:
    """Records the duration of each collection, per generation, via gc.callbacks."""

    def __init__(self) -> None:
        self.pauses_ns: dict[int, list[int]] = {0: [], 1: [], 2: []}
        self._start = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
        else:
            self.pauses_ns.setdefault(info["generation"], []).append(
                time.perf_counter_ns() - self._start
            )

    def __enter__(self) -> GcObserver:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            str(g): {
                "count": len(p),
                "max_ms": (max(p) / 1e6 if p else 0.0),
                "total_ms": sum(p) / 1e6,
            }
            for g, p in sorted(self.pauses_ns.items())
        }


def add_args(spec: Any) -> AddArgs:
    return (spec.id, spec.database, spec.collection, list(spec.filters), spec.expression)


def timed_adds(matcher: Any, args: list[AddArgs]) -> float:
    """Seconds spent adding ``args`` (nothing else inside the clock)."""
    add = matcher.add
    t0 = time.perf_counter()
    for sid, db, coll, filters, expression in args:
        add(sid, db, coll, filters=filters, expression=expression)
    return time.perf_counter() - t0


# ------------------------------------------------- filters as CEL (baseline)
def cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return 'double("NaN")'
        if math.isinf(value):
            return 'double("Infinity")' if value > 0 else 'double("-Infinity")'
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON escapes are valid CEL escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(cel_literal(v) for v in value) + "]"
    raise TypeError(f"no CEL literal for {type(value).__name__}")


def cel_field(field: str) -> str:
    if field == "_id":
        return "doc_id"
    return "doc" + "".join(f"[{cel_literal(part)}]" for part in field.split("."))


_CEL_OPS = {
    "==": "==",
    "eq": "==",
    "!=": "!=",
    "ne": "!=",
    ">": ">",
    "gt": ">",
    ">=": ">=",
    "gte": ">=",
}
_CEL_OPS |= {"<": "<", "lt": "<", "<=": "<=", "lte": "<="}


def filter_to_cel(field: str, op: str, value: Any) -> str:
    lhs, rhs = cel_field(field), cel_literal(value)
    if op in _CEL_OPS:
        return f"{lhs} {_CEL_OPS[op]} {rhs}"
    if op == "in":
        return f"{lhs} in {rhs}"
    if op == "contains":
        return f"(type({lhs}) == list ? {rhs} in {lhs} : {lhs}.contains({rhs}))"
    raise ValueError(f"unsupported operator {op!r}")


def subscription_to_cel(filters: Sequence[Any], expression: str | None) -> str:
    """One CEL expression over ``doc`` and ``doc_id`` equivalent to the subscription."""
    parts = [filter_to_cel(f.field, f.op, f.value) for f in filters]
    if expression is not None:
        parts.append(f"({expression})")
    return " && ".join(parts) if parts else "true"


# ------------------------------------------------------------ the fixture
@dataclass
class Loaded:
    n: int
    workload: Any
    matcher: Any
    ids: list[str]
    events: list[EventTuple]  # WARMUP warm-up events, then EVENTS timed ones
    row: dict[str, Any]


def _fill_meta(results: dict[str, Any]) -> None:
    meta = results["meta"]
    meta.setdefault("seed", SEED)
    meta.setdefault("events", EVENTS)
    meta.setdefault("warmup_events", WARMUP)
    meta.setdefault("sizes", SIZES)
    meta.setdefault("gc_threshold", gc.get_threshold())


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"N={n}")
def loaded(request: pytest.FixtureRequest, bench_results: dict[str, Any]) -> Iterator[Loaded]:
    from streamer.matching.matcher import Matcher
    from streamer.tools.workload import Workload

    n = request.param
    _fill_meta(bench_results)
    row = bench_results["sizes"].setdefault(n, {})
    wl = Workload(n, seed=SEED)
    row["full_gc_pause_before_load_ms"] = max(full_gc_pauses_ms(3))

    # The harness's pre-built arguments (gc off while building: a 1M-object
    # list built under the collector is twice as slow and measures nothing).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        structured: list[AddArgs] = []
        cel_subs: list[AddArgs] = []
        for spec in wl.subscriptions():
            (structured if spec.expression is None else cel_subs).append(add_args(spec))
    finally:
        if was_enabled:
            gc.enable()
    ids = [a[0] for a in structured] + [a[0] for a in cel_subs]

    matcher = Matcher()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        t_structured = timed_adds(matcher, structured)
        t_cel = timed_adds(matcher, cel_subs)
    finally:
        n_structured, n_cel = len(structured), len(cel_subs)
        del structured, cel_subs
        if gc.get_freeze_count() <= frozen:  # leave alone anything the matcher froze itself
            gc.unfreeze()
    assert len(matcher) == n, f"matcher holds {len(matcher)} subscriptions after {n} adds"
    row["structured_subscriptions"] = n_structured
    row["cel_subscriptions"] = n_cel
    row["structured_adds_per_s"] = n_structured / t_structured if t_structured > 0 else math.inf
    row["cel_adds_per_s"] = n_cel / t_cel if t_cel > 0 else math.inf
    row["inprocess_full_gc_pause_ms"] = max(full_gc_pauses_ms())

    events = [
        (e.database, e.collection, e.document_id, e.document) for e in wl.events(WARMUP + EVENTS)
    ]
    yield Loaded(n, wl, matcher, ids, events, row)

    # Teardown: remove everything, in random order.
    random.Random(f"bench-remove/{SEED}").shuffle(ids)
    remove = matcher.remove
    t0 = time.perf_counter()
    removed = 0
    for sid in ids:
        removed += remove(sid) is True
    t_remove = time.perf_counter() - t0
    row["removes_per_s"] = len(ids) / t_remove if t_remove > 0 else math.inf
    assert removed == n and len(matcher) == 0, f"removed {removed} of {n}; {len(matcher)} left"


# ------------------------------------------------------ subprocess probe
# Run with ``python -c PROBE_SCRIPT N SEED`` in a fresh interpreter that imports
# only what it needs (not pytest): load N subscriptions into a new Matcher,
# print one JSON line with the RSS growth and the full-GC pauses.
PROBE_SCRIPT = r"""
import gc, itertools, json, sys, time

import psutil

from streamer.matching.matcher import Matcher
from streamer.tools.workload import Workload


def pauses_ms(repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        gc.collect()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


n, seed, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
proc = psutil.Process()
subs = Workload(n, seed=seed).subscriptions()
first = next(subs)  # the generator's own state exists before the baseline
matcher = Matcher()
before = pauses_ms(repeats)
rss0 = proc.memory_info().rss
add = matcher.add
t0 = time.perf_counter()
for spec in itertools.chain((first,), subs):
    add(spec.id, spec.database, spec.collection, filters=list(spec.filters),
        expression=spec.expression)
load_s = time.perf_counter() - t0
del first, spec, subs
gc.collect()
rss1 = proc.memory_info().rss
after = pauses_ms(repeats)
print(json.dumps({
    "n": n,
    "loaded": len(matcher),
    "rss_before_bytes": rss0,
    "rss_after_bytes": rss1,
    "bytes_per_sub": (rss1 - rss0) / n,
    "full_gc_pause_max_ms": max(after),
    "full_gc_pauses_ms": after,
    "full_gc_pause_before_load_ms": max(before),
    "gc_tracked_objects": len(gc.get_objects()),
    "load_with_generation_s": load_s,
}))
"""


# -------------------------------------------------------------------- tests
def test_match_latency(loaded: Loaded) -> None:
    """Per-event match time over the workload's event stream."""
    match = loaded.matcher.match
    for db, coll, did, doc in loaded.events[:WARMUP]:
        match(db, coll, did, doc)
    timed = loaded.events[WARMUP:]
    pc = time.perf_counter_ns

    overhead = []
    for _ in range(10_000):
        t0 = pc()
        overhead.append(pc() - t0)
    overhead.sort()

    times = [0] * len(timed)
    counts = [0] * len(timed)
    duplicates = 0
    with GcObserver() as gco:
        for i, (db, coll, did, doc) in enumerate(timed):
            t0 = pc()
            result = match(db, coll, did, doc)
            times[i] = pc() - t0
            counts[i] = len(result)
            if len(set(result)) != len(result):
                duplicates += 1
            # Free this result here, not inside the next timed call (rebinding
            # `result` there would bill its deallocation to the next event).
            del result
    times.sort()
    counts.sort()
    row = loaded.row
    row["match_events"] = len(times)
    row["match_p50_us"] = percentile(times, 0.50) / 1000
    row["match_p99_us"] = percentile(times, 0.99) / 1000
    row["match_p999_us"] = percentile(times, 0.999) / 1000
    row["match_max_us"] = times[-1] / 1000
    row["match_mean_us"] = sum(times) / len(times) / 1000
    row["timer_overhead_ns_p50"] = percentile(overhead, 0.5)
    row["matches_per_event_mean"] = sum(counts) / len(counts)
    row["matches_per_event_p50"] = percentile(counts, 0.5)
    row["matches_per_event_p99"] = percentile(counts, 0.99)
    row["matches_per_event_max"] = counts[-1]
    row["gc_during_match"] = gco.summary()
    assert duplicates == 0, f"{duplicates} events returned duplicate ids"
    assert counts[-1] > 0, "no event matched anything: workload and matcher disagree"


def test_match_pytest_benchmark(loaded: Loaded, benchmark: Any) -> None:
    """The same per-event call, under pytest-benchmark (cycles over the stream)."""
    match = loaded.matcher.match
    stream = itertools.cycle(loaded.events[WARMUP:])

    def one_event() -> Any:
        db, coll, did, doc = next(stream)
        return match(db, coll, did, doc)

    benchmark.group = f"match N={loaded.n}"
    benchmark.extra_info["n_subscriptions"] = loaded.n
    benchmark(one_event)


def test_memory_and_gc_in_fresh_process(loaded: Loaded, bench_results: dict[str, Any]) -> None:
    """Bytes per subscription and worst full-GC pause, in a fresh subprocess."""
    import streamer

    root = str(Path(streamer.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT, str(loaded.n), str(SEED), str(GC_REPEATS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert proc.returncode == 0, f"probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    row = loaded.row
    row["bytes_per_sub"] = probe["bytes_per_sub"]
    row["full_gc_pause_ms"] = probe["full_gc_pause_max_ms"]
    row["probe"] = probe


def test_linear_baseline(loaded: Loaded) -> None:
    """Every subscription of the collection evaluated by cel-expr-python, per event."""
    if loaded.n > BASELINE_MAX_N:
        pytest.skip(f"linear baseline runs at N <= {BASELINE_MAX_N} only")
    from cel_expr_python import cel

    env = cel.NewEnv(variables={"doc": cel.Type.DYN, "doc_id": cel.Type.STRING})
    programs: dict[tuple[str, str], list[tuple[str, Any]]] = defaultdict(list)
    t0 = time.perf_counter()
    for spec in loaded.workload.subscriptions():
        program = env.compile(
            subscription_to_cel(spec.filters, spec.expression), disable_check=True
        )
        programs[(spec.database, spec.collection)].append((spec.id, program))
    compile_s = time.perf_counter() - t0

    events = loaded.events[WARMUP : WARMUP + BASELINE_EVENTS]
    match = loaded.matcher.match
    pc = time.perf_counter_ns
    base_times: list[int] = []
    mismatches: list[str] = []
    deadline = time.perf_counter() + BASELINE_SECONDS
    for db, coll, did, doc in events:
        t0 = pc()
        activation = env.Activation({"doc": doc, "doc_id": did})
        hits = [
            sid
            for sid, program in programs.get((db, coll), ())
            if program.eval(activation).value() is True
        ]
        base_times.append(pc() - t0)
        got = match(db, coll, did, doc)
        if set(hits) != set(got) and len(mismatches) < 5:
            mismatches.append(
                f"{coll}/{did}: index-only {sorted(set(got) - set(hits))[:5]}, "
                f"CEL-only {sorted(set(hits) - set(got))[:5]}"
            )
        if len(base_times) >= BASELINE_MIN_EVENTS and time.perf_counter() > deadline:
            break
    used = events[: len(base_times)]
    del programs

    # The index on exactly the same events (warm), 20 passes.
    for db, coll, did, doc in used:
        match(db, coll, did, doc)
    idx_times: list[int] = []
    for _ in range(20):
        for db, coll, did, doc in used:
            t0 = pc()
            match(db, coll, did, doc)
            idx_times.append(pc() - t0)
    base_times.sort()
    idx_times.sort()
    base_mean = sum(base_times) / len(base_times)
    idx_mean = sum(idx_times) / len(idx_times)
    row = loaded.row
    row["linear_baseline_events"] = len(base_times)
    row["linear_baseline_compile_per_s"] = loaded.n / compile_s
    row["linear_baseline_mean_ms"] = base_mean / 1e6
    row["linear_baseline_p50_ms"] = percentile(base_times, 0.5) / 1e6
    row["linear_index_same_events_mean_us"] = idx_mean / 1000
    row["linear_index_same_events_p50_us"] = percentile(idx_times, 0.5) / 1000
    row["linear_ratio_mean"] = base_mean / idx_mean
    row["linear_ratio_p50"] = percentile(base_times, 0.5) / percentile(idx_times, 0.5)
    row["linear_ratio"] = min(row["linear_ratio_mean"], row["linear_ratio_p50"])
    row["linear_baseline_mismatches"] = len(mismatches)
    assert not mismatches, "index and CEL linear scan disagree: " + "; ".join(mismatches)
