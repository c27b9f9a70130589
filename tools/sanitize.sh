#!/usr/bin/env bash
# Build the Cython extensions with ASan+UBSan (CMakeLists.txt) into build-sanitize/
# and run the core and CEL tests against them. Exits non-zero on any sanitizer report.
#   PYTHON=.venv/bin/python tools/sanitize.sh [extra pytest args]
# Needs cmake, gcc, and Cython + pytest + hypothesis in $PYTHON's environment.
set -euo pipefail

# Resolve $PYTHON against the caller's cwd before we cd. No realpath: resolving
# a venv's python symlink would escape the venv and lose its site-packages.
PYTHON=$(command -v "${PYTHON:-python3}")
case $PYTHON in /*) ;; *) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac

cd "$(dirname "$0")/.."
BUILD=$PWD/build-sanitize

# `pip install -e .` builds in isolation, so a dev venv usually lacks Cython.
"$PYTHON" -c 'import Cython' 2>/dev/null || {
    echo "sanitize.sh: Cython is not installed for $PYTHON; run: $PYTHON -m pip install 'Cython>=3.0.10'" >&2
    exit 2
}

cmake -S . -B "$BUILD" -DPython_EXECUTABLE="$PYTHON"
cmake --build "$BUILD"

tests=()
for t in tests/test_matcher.py tests/test_cel.py tests/test_celparse.py tests/test_delivery.py tests/test_ingest_step.py; do [[ -e $t ]] && tests+=("$t"); done

# The interpreter is not instrumented, so the sanitizer runtimes must be loaded
# before anything else (GCC keeps UBSan's in a separate library).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# detect_leaks=0: CPython deliberately does not free everything at exit, so
# LeakSanitizer would fail every run. abort_on_error / halt_on_error: any report
# kills the run (non-zero exit, plus a Python traceback from faulthandler).
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
# Route Python's allocations through ASan's malloc instead of pymalloc arenas,
# so overruns into Python objects are caught too.
export PYTHONMALLOC=malloc
export PYTHONPATH=$BUILD/stage

# -P everywhere: `python -m` would otherwise put the repo (with the normal .so)
# ahead of PYTHONPATH, and the conftest only checks "is an extension".
"$PYTHON" -P -c 'import os, streamer._ext._core as c, streamer._ext._celparse as p, streamer._ext._fanout as f, streamer._ext._ingest as i
for m in (c, p, f, i):
    assert os.path.abspath(m.__file__).startswith(os.environ["PYTHONPATH"] + "/"), m.__file__'

# --capture=sys: sanitizers write to fd 2, which fd-level capture would swallow
# along with the aborted process. The example counts are the tests' own: the
# whole run (build included) stays within a few minutes.
exec "$PYTHON" -P -m pytest --capture=sys -p no:cacheprovider "${tests[@]}" "$@"
