"""pytest configuration of the benchmark suite (``bench/``; not part of the tests).

- Collects ``bench_*.py`` when the session was started on ``bench/`` (or a
  path inside it), so ``pytest bench/`` and ``pytest bench/bench_matching.py``
  both work, while a bare ``pytest`` from the repository root never runs the
  benchmarks by accident.
- Holds the figures the benchmark modules record (fixture ``bench_results``)
  and, at the end of the session, prints one table of them beside the
  targets, marking each PASS/MISS, and writes them to
  ``bench/results/matching.json``. Nothing here uses the cache provider or
  pytest-benchmark's own machinery, so the table also appears with
  ``-p no:cacheprovider`` and ``--benchmark-disable``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results" / "matching.json"

# column key, heading, format, target (op, threshold, N the target is stated at or None = every N)
COLUMNS: tuple[tuple[str, str, str, tuple[str, float, int | None] | None], ...] = (
    ("match_p50_us", "match p50 µs", "{:.2f}", ("<=", 8.0, 1_000_000)),
    ("match_p99_us", "match p99 µs", "{:.2f}", ("<=", 25.0, 1_000_000)),
    ("structured_adds_per_s", "struct adds/s", "{:,.0f}", (">=", 200_000.0, None)),
    ("cel_adds_per_s", "CEL adds/s", "{:,.0f}", (">=", 50_000.0, None)),
    ("removes_per_s", "removes/s", "{:,.0f}", None),
    ("bytes_per_sub", "bytes/sub", "{:.0f}", ("<=", 500.0, None)),
    ("full_gc_pause_ms", "full GC ms", "{:.2f}", None),
    ("linear_ratio", "linear x", "{:,.0f}", (">=", 1000.0, 100_000)),
)

_RESULTS_KEY = pytest.StashKey[dict[str, Any]]()


# ---------------------------------------------------------------- collection
def _session_targets_bench(config: pytest.Config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        p = (base / arg.split("::", 1)[0]).resolve()
        if p == BENCH_DIR or BENCH_DIR in p.parents:
            return True
    return False


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)  # explicit paths are collected anyway
        and _session_targets_bench(parent.config)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ------------------------------------------------------------------- results
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS_KEY] = {"sizes": {}, "notes": {}, "meta": {}, "reports": []}


@pytest.fixture(scope="session")
def bench_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines other suites (``bench_ingest``) print in the final summary."""
    reports: list[str] = request.config.stash[_RESULTS_KEY]["reports"]
    return reports


@pytest.fixture(scope="session")
def bench_results(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Shared, session-wide store: ``["sizes"][N][key] = figure``, ``["meta"]``."""
    return request.config.stash[_RESULTS_KEY]


def _status(value: float | None, target: tuple[str, float, int | None] | None) -> str:
    if target is None or value is None:
        return ""
    op, thr, _ = target
    ok = value <= thr if op == "<=" else value >= thr
    return "PASS" if ok else "MISS"


def _fmt_target(target: tuple[str, float, int | None] | None) -> str:
    if target is None:
        return "—"
    op, thr, at = target
    sym = "≤" if op == "<=" else "≥"
    t = f"{thr:,.0f}" if thr >= 1000 else f"{thr:g}"
    where = "" if at is None else f" @{at // 1000}k" if at < 1_000_000 else f" @{at // 1_000_000}M"
    return f"{sym} {t}{where}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _details(fig: dict[str, Any]) -> list[str]:
    out = []
    if "matches_per_event_mean" in fig:
        out.append(
            "matches per event: mean {:.1f}, p50 {:.0f}, p99 {:.0f}, max {:.0f}".format(
                fig["matches_per_event_mean"],
                fig["matches_per_event_p50"],
                fig["matches_per_event_p99"],
                fig["matches_per_event_max"],
            )
        )
    if "match_mean_us" in fig:
        out.append(
            "match: mean {:.2f} µs, p99.9 {:.2f} µs, max {:.1f} µs over {} events".format(
                fig["match_mean_us"], fig["match_p999_us"], fig["match_max_us"], fig["match_events"]
            )
        )
    if "gc_during_match" in fig:
        g = fig["gc_during_match"]
        out.append(
            "GC during the match loop: "
            + ", ".join(
                f"gen{k} n={v['count']} max {v['max_ms']:.2f} ms" for k, v in sorted(g.items())
            )
        )
    if "probe" in fig:
        p = fig["probe"]
        out.append(
            "fresh process: RSS {:.1f} -> {:.1f} MiB, full GC {:.2f} ms before load, "
            "{:.2f} ms after; {:,} GC-tracked objects".format(
                p["rss_before_bytes"] / 2**20,
                p["rss_after_bytes"] / 2**20,
                p["full_gc_pause_before_load_ms"],
                p["full_gc_pause_max_ms"],
                p["gc_tracked_objects"],
            )
        )
    if "inprocess_full_gc_pause_ms" in fig:
        out.append(
            "bench process: full GC {:.2f} ms before load, {:.2f} ms after".format(
                fig.get("full_gc_pause_before_load_ms", float("nan")),
                fig["inprocess_full_gc_pause_ms"],
            )
        )
    if "linear_baseline_mean_ms" in fig:
        out.append(
            "linear CEL scan: {:.1f} ms/event (p50 {:.1f} ms) over {} events; index on the same "
            "events {:.2f} µs mean; ratio of means {:,.0f}x, of p50s {:,.0f}x".format(
                fig["linear_baseline_mean_ms"],
                fig["linear_baseline_p50_ms"],
                fig["linear_baseline_events"],
                fig["linear_index_same_events_mean_us"],
                fig["linear_ratio_mean"],
                fig["linear_ratio_p50"],
            )
        )
    return out


def _render(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    meta = results["meta"]
    head = ["N"] + [c[1] for c in COLUMNS]
    rows: list[list[str]] = []
    for n in sorted(sizes):
        fig = sizes[n]
        row = [f"{n:,}"]
        for key, _, fmt, target in COLUMNS:
            v = fig.get(key)
            if v is None:
                row.append("—")
                continue
            cell = fmt.format(v)
            st = _status(v, target)
            if st:
                applies = target is not None and (target[2] is None or target[2] == n)
                cell += f" {st}" if applies else f" ({st})"
            row.append(cell)
        rows.append(row)
    rows.append(["target"] + [_fmt_target(c[3]) for c in COLUMNS])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    out = [
        "streamer matching benchmark — {date}, host {host}, {cpus} CPUs, {py}, seed {seed}, "
        "{events} timed events/N".format(
            date=meta.get("date", "?"),
            host=meta.get("host", "?"),
            cpus=meta.get("cpu_count", "?"),
            py=meta.get("python", "?"),
            seed=meta.get("seed", "?"),
            events=meta.get("events", "?"),
        ),
        line(head),
        "-+-".join("-" * w for w in widths),
    ]
    out += [line(r) for r in rows[:-1]]
    out.append("-+-".join("-" * w for w in widths))
    out.append(line(rows[-1]))
    out.append(
        "PASS/MISS without parentheses: the target applies at that N; "
        "in parentheses: indicative only (the target is stated for another N)."
    )
    # Verdict at the N each target is stated for.
    verdict = []
    for key, title, fmt, target in COLUMNS:
        if target is None:
            continue
        at = target[2]
        ns = [n for n in sorted(sizes) if (at is None or n == at) and sizes[n].get(key) is not None]
        if not ns:
            verdict.append(f"{title} {_fmt_target(target)}: not measured (that N was not run)")
            continue
        parts = [
            f"N={n:,}: {fmt.format(sizes[n][key])} {_status(sizes[n][key], target)}" for n in ns
        ]
        verdict.append(f"{title} {_fmt_target(target)}: " + ", ".join(parts))
    out.append("Targets, at the N each is stated for:")
    out += [f"  {v}" for v in verdict]
    for n in sorted(sizes):
        details = _details(sizes[n])
        if details:
            out += [f"N={n:,}:"] + [f"  {d}" for d in details]
    for note in results["notes"].values():
        out.append(note)
    return out


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS_KEY, None)
    if results and results["reports"]:
        terminalreporter.write_sep("=", "service benchmarks")
        for text in results["reports"]:
            terminalreporter.write_line(text)
    if not results or not results["sizes"]:
        return
    meta = results["meta"]
    meta.setdefault("date", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    meta.setdefault("host", platform.node())
    meta.setdefault("cpu_count", os.cpu_count())
    meta.setdefault("python", f"{platform.python_implementation()} {platform.python_version()}")
    meta.setdefault("platform", platform.platform())
    meta.setdefault("commit", _git_commit())
    terminalreporter.write_sep("=", "matching benchmark")
    for text in _render(results):
        terminalreporter.write_line(text)
    payload = {
        "meta": meta,
        "targets": {
            key: _fmt_target(target) for key, _, _, target in COLUMNS if target is not None
        },
        "sizes": {str(n): results["sizes"][n] for n in sorted(results["sizes"])},
        "notes": results["notes"],
        "argv": sys.argv[1:],
    }
    try:
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(
            json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )
        terminalreporter.write_line(f"figures written to {RESULTS_PATH}")
    except OSError as exc:  # a read-only checkout must not lose the table
        terminalreporter.write_line(f"could not write {RESULTS_PATH}: {exc}")
