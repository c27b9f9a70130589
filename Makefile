# Everyday commands. Each creates .venv on first use and installs what it needs
# from pyproject.toml; PYTHON picks the interpreter (3.11+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXT_MODULES := streamer._ext._core streamer._ext._celparse streamer._ext._fanout streamer._ext._ingest \
	streamer._ext._subscribe

.PHONY: test bench bench-e2e reliability chaos demo lint proto sanitize wheel clean \
	fuzz-cel fuzz-events fuzz-gateway fuzz-smoke

$(STAMP): pyproject.toml setup.py streamer/_ext/*.pyx streamer/_ext/*.pxd
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench,lint,dev,fuzz]'
	touch $(STAMP)

## Run the test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q tests

## Run the benchmarks: matching (STREAMER_BENCH_SIZES, default 100000,1000000),
## then the ingest of one `streamer serve` process (STREAMER_BENCH_INGEST_*).
bench: $(STAMP)
	$(PY) -m pytest -q bench/bench_matching.py bench/bench_ingest.py bench/bench_transport.py \
		bench/bench_registration.py

## The end-to-end benchmark (`streamer bench e2e` under pytest-benchmark):
## Puller, Streamer (and a pass-through relay) and 8 gateways as processes;
## six to eight minutes. STREAMER_BENCH_E2E_* size it (bench/bench_e2e.py).
bench-e2e: $(STAMP)
	$(PY) -m pytest -q bench/bench_e2e.py

## The reliability figures (docs/reliability.md): abuse, churn and crash, one
## after the other, with real streamer serve, streamer puller and gateway
## processes on loopback, then resume (docs/benchmarks.md, Live latency while
## subscriptions catch up). STREAMER_RELIABILITY_QUICK=1 make reliability is
## the quick run; STREAMER_BENCH_ABUSE_*, _CHURN_*, _CRASH_* and _RESUME_*
## size each (bench/bench_abuse.py, bench_churn.py, bench_crash.py,
## bench_resume.py). Not part of test.
reliability: $(STAMP)
	$(PY) -m pytest -q bench/bench_abuse.py bench/bench_churn.py bench/bench_crash.py \
		bench/bench_resume.py

## The cluster chaos run (docs/reliability.md, Chaos (cluster)): a Puller,
## 3 cluster nodes, a 3-member etcd and 4 gateway processes holding 50,000
## subscriptions, with seeded kill -9s of each kind for 10 minutes, and a
## check of every delivery; about 12 minutes. STREAMER_BENCH_CHAOS_* size it
## (bench/bench_chaos.py); tests/test_chaos.py is its one-minute variant.
chaos: $(STAMP)
	$(PY) -m pytest -q bench/bench_chaos.py

## The main job: the whole pipeline on loopback (Puller, Streamer, 4 gateway
## processes, 20 000 subscriptions, 2 000 events/s for 12 s), a live display,
## a summary and a check of every delivery. DEMO_ARGS passes options, e.g.
## make demo DEMO_ARGS="--rate 5000 --duration 30" (--plot FILE needs the
## plot extra: .venv/bin/pip install -e '.[plot]').
demo: $(STAMP)
	$(VENV)/bin/streamer demo $(DEMO_ARGS)

## ruff, mypy, and stubtest: the hand-written .pyi of each compiled module
## against the module as built (tools/stubtest-allowlist.txt says what it
## cannot check in Cython).
lint: $(STAMP)
	$(PY) -m ruff check streamer tests bench tools fuzz
	$(PY) -m mypy
	$(PY) -m mypy.stubtest --mypy-config-file pyproject.toml \
		--allowlist tools/stubtest-allowlist.txt $(EXT_MODULES)

## Regenerate the protocol stubs in streamer/protocol/ from proto/.
proto: $(STAMP)
	$(PY) tools/gen_proto.py

## The core tests against an AddressSanitizer + UBSan build (CMakeLists.txt).
sanitize: $(STAMP)
	PYTHON=$(PY) tools/sanitize.sh

## Fuzz one target (fuzz/, docs/reliability.md) until stopped, or for
## FUZZ_SECONDS. The committed seeds in fuzz/corpus/<target>/ are read, never
## written: what the fuzzer finds goes to build/fuzz/<target>/corpus/, and a
## crashing input to build/fuzz/<target>/crash-*. FUZZ_ARGS passes libFuzzer
## options (e.g. FUZZ_ARGS=-jobs=2).
FUZZ_SECONDS ?=
FUZZ_ARGS ?=
FUZZ_DIR := build/fuzz
# A slow input is a defect too (every expression and event is bounded).
FUZZ_FLAGS = -timeout=30 -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/$*/ \
	$(if $(FUZZ_SECONDS),-max_total_time=$(FUZZ_SECONDS)) \
	$(addprefix -dict=,$(wildcard fuzz/$*.dict))
# Room for an expression past the CEL parser's 4096-character bound, and a
# document, in one input (libFuzzer's default is 4096 bytes in all).
fuzz-cel: FUZZ_FLAGS += -max_len=12288
fuzz-cel fuzz-events fuzz-gateway: fuzz-%: $(STAMP)
	mkdir -p $(FUZZ_DIR)/$*/corpus
	$(PY) fuzz/fuzz_$*.py $(FUZZ_FLAGS) $(FUZZ_ARGS) $(FUZZ_DIR)/$*/corpus fuzz/corpus/$*

## Each fuzz target for FUZZ_SECONDS (default 60) seconds; fails on any crash.
fuzz-smoke: $(STAMP)
	$(MAKE) fuzz-cel FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60)
	$(MAKE) fuzz-events FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60)
	$(MAKE) fuzz-gateway FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60)

## Build an sdist and a wheel into dist/.
wheel: $(STAMP)
	$(PY) -m pip install --quiet build
	$(PY) -m build

clean:
	rm -rf $(VENV) build build-sanitize dist *.egg-info streamer/_ext/*.c streamer/_ext/*.so
