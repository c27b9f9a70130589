"""End-to-end benchmark: Puller, Streamer and gateways as processes on loopback.

The driver is ``streamer.tools.benchmark`` (also ``streamer bench e2e``); this
module runs it under pytest-benchmark, which times the whole run once
(``benchmark.pedantic``, one round: the figures that matter are measured
inside it, per offered rate), and prints its table in the final summary.

Sizes come from the environment: ``STREAMER_BENCH_E2E_N`` (100000),
``STREAMER_BENCH_E2E_GATEWAYS`` (8), ``STREAMER_BENCH_E2E_RATES``
(5000,10000,30000,50000; batched variant and relay),
``STREAMER_BENCH_E2E_PLAIN_RATES`` (5000,10000), ``STREAMER_BENCH_E2E_SECONDS``
(10, the measured window per rate), ``STREAMER_BENCH_E2E_WARMUP`` (4),
``STREAMER_BENCH_E2E_VARIANTS`` (relay,batched,plain),
``STREAMER_BENCH_E2E_MAX`` (1: search the maximum sustainable rate).
``STREAMER_BENCH_PROFILE=FILE`` records the Streamer with py-spy at 10k and
50k (batched) into ``FILE.10000`` and ``FILE.50000``. Figures go to
``bench/results/e2e.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streamer.tools.benchmark import Config, render, run

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "e2e.json"


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x]


def _config() -> Config:
    env = os.environ.get
    return Config(
        n=int(env("STREAMER_BENCH_E2E_N", "100000")),
        gateways=int(env("STREAMER_BENCH_E2E_GATEWAYS", "8")),
        rates=_ints("STREAMER_BENCH_E2E_RATES", "5000,10000,30000,50000"),
        plain_rates=_ints("STREAMER_BENCH_E2E_PLAIN_RATES", "5000,10000"),
        seconds=float(env("STREAMER_BENCH_E2E_SECONDS", "10")),
        warmup=float(env("STREAMER_BENCH_E2E_WARMUP", "4")),
        variants=[v for v in env("STREAMER_BENCH_E2E_VARIANTS", "relay,batched,plain")
                  .split(",") if v],
        search_max=env("STREAMER_BENCH_E2E_MAX", "1") not in ("0", ""),
        profile=env("STREAMER_BENCH_PROFILE") or None,
        out=RESULTS_PATH,
    )


def test_e2e(benchmark: Any, bench_report: list[str]) -> None:
    config = _config()
    benchmark.group = f"e2e N={config.n}"
    results = benchmark.pedantic(run, args=(config,), rounds=1, iterations=1)
    bench_report.extend([*render(results), f"figures written to {RESULTS_PATH}"])
    # Not a timing assertion: every variant ran every rate.
    for name, variant in results["variants"].items():
        rates = config.plain_rates if name == "plain" else config.rates
        assert [r["offered_per_s"] for r in variant["runs"] if not r.get("max_search")] == rates
