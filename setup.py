"""Build the Cython extensions; all metadata lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# STREAMER_DEBUG=1: no optimisation, with symbols (for gdb). Sanitizer builds
# are CMake's job (`make sanitize`).
extra = ["-O2"]
if os.environ.get("STREAMER_DEBUG"):
    extra = ["-O0", "-g"]

setup(
    ext_modules=cythonize(
        [
            Extension(f"streamer._ext.{m}", [f"streamer/_ext/{m}.pyx"], extra_compile_args=extra)
            for m in ("_core", "_celparse", "_fanout", "_ingest", "_subscribe")
        ],
        compiler_directives={"language_level": "3"},
    ),
)
