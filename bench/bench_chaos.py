"""Chaos (cluster): seeded ``kill -9``s of a node, a gateway, the Puller and
an etcd member of a Streamer cluster under load, and an exact check of
every delivery against the Puller's log (docs/reliability.md, Chaos
(cluster)). The run and the check are ``streamer.tools.chaos`` (its
docstring says how); ``tests/test_chaos.py`` is the short variant.

Sizes (``STREAMER_BENCH_CHAOS_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``N`` 50000 (2000) subscriptions on
``GATEWAYS`` 4 (2) gateway processes, 3 nodes, a 3-member etcd, a Puller
at ``RATE`` 200 (100) events/s, ``DURATION`` 600 (60) s of chaos, a kill
every ``PAUSE_MIN``-``PAUSE_MAX`` 4-12 (3-6) s, each process down for
0.5-3 s, ``SEED`` 1. Figures: ``bench/results/chaos.json``, every
process's log: ``bench/results/chaos-logs/``. ``make chaos``, not part of
``make reliability`` (it takes about 12 minutes).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from statistics import median
from typing import Any

import pytest
from reliability import count, keep_logs, machine, record, size, table, work_dir

from streamer.tools.chaos import KINDS, Config, run
from streamer.tools.etcd_members import ETCD_MISSING

CONFIG = Config(
    subscriptions=count("STREAMER_BENCH_CHAOS_N", 50_000, 2_000),
    gateways=count("STREAMER_BENCH_CHAOS_GATEWAYS", 4, 2),
    rate=size("STREAMER_BENCH_CHAOS_RATE", 200, 100),
    duration=size("STREAMER_BENCH_CHAOS_DURATION", 600, 60),
    seed=count("STREAMER_BENCH_CHAOS_SEED", 1, 1),
    pause=(size("STREAMER_BENCH_CHAOS_PAUSE_MIN", 4, 3),
           size("STREAMER_BENCH_CHAOS_PAUSE_MAX", 12, 6)),
)
# What each kind's recovery is measured as (streamer.tools.chaos.Chaos.kill_one).
RECOVERY = {
    "node": ("settled_s", "kill to its shards held under its new lease"),
    "gateway": ("ready_s", "restart to every subscription accepted again"),
    "puller": ("flowing_s", "kill to every node's saved marker moving again"),
    "etcd": ("healthy_s", "kill to the member healthy again"),
}


def render(figures: dict[str, Any]) -> list[str]:
    c, o = figures["config"], figures["outcome"]
    kills = Counter(k["kind"] for k in figures["kills"])
    rows = [[
        ", ".join(f"{kills[kind]} x {kind}" for kind in KINDS)
        + f" (seed {c['seed']}; every {c['pause'][0]:g}-{c['pause'][1]:g} s, down "
        f"{c['downtime'][0]:g}-{c['downtime'][1]:g} s)",
        f"{figures['finish']['last_position']:,} events at {c['rate']:g}/s, "
        f"{c['subscriptions']:,} subscriptions on {c['gateways']} gateways, {c['nodes']} nodes, "
        f"{c['duration']:g} s of chaos",
        f"{o['deliveries']:,} of {o['expected']:,} expected",
        f"{o['missing']:,}" + (" PASS" if not o["missing"] else " FAIL"),
        f"{o['duplicates']:,} (in {o['subscriptions_with_duplicates']:,} subscriptions)",
        f"{o['unexplained_jumps']:,} / {o['out_of_order']:,} / {o['unexpected']:,}",
    ]]
    lines = ["", *table(["kills (kill -9, then started again)", "flow", "deliveries checked",
                         "missing", "duplicates",
                         "unexplained jumps / out of order / unexpected"], rows), ""]
    for kind, (key, what) in RECOVERY.items():
        values = [k[key] for k in figures["kills"] if k["kind"] == kind and k.get(key) is not None]
        if values:
            lines.append(f"{kind} ({what}), s: min {min(values):.2f} / median "
                         f"{median(values):.2f} / max {max(values):.2f}")
    lines.append(f"processes that died on their own (started again): "
                 f"{figures['unplanned_restarts'] or 'none'}")
    lines.append(f"start {figures['start_s']:.0f} s, run {figures['run_s']:.0f} s, "
                 f"verified in {figures['verify_s']:.0f} s; {figures['finish']}")
    if o["examples"]:
        lines += ["examples:", *(f"  {e}" for e in o["examples"])]
    return lines


@pytest.mark.timeout(7200)
def test_chaos(benchmark: Any, bench_report: list[str], tmp_path: Path) -> None:
    if ETCD_MISSING:
        pytest.skip(ETCD_MISSING)
    benchmark.group = "reliability"
    work = work_dir(tmp_path)
    meta = machine()
    passed = False
    try:
        figures = benchmark.pedantic(run, args=(CONFIG, work), rounds=1, iterations=1)
        figures["meta"] = meta
        passed = figures["passed"]
    finally:
        # Kept even when the run passed: they say why a node fenced itself.
        print(f"logs kept in {keep_logs(work, 'chaos')}")
        if passed and work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)
        elif not passed:
            print(f"the run's directory (the gateways' deliveries, the Puller's log) kept: {work}")
    record("chaos", bench_report, figures, render(figures), benchmark)
    outcome = figures["outcome"]
    assert {k["kind"] for k in figures["kills"]} == set(KINDS)
    assert outcome["deliveries"] > 0
    assert outcome["missing"] == 0, outcome["examples"]
    assert outcome["unexplained_jumps"] == 0, outcome["examples"]
    assert outcome["out_of_order"] == 0, outcome["examples"]
    assert outcome["unexpected"] == 0, outcome["examples"]
