"""Build the Cython extension; all metadata lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# STREAMER_SANITIZE=1 is for debugging only; `make sanitize` uses CMake.
extra = ["-O2"]
if os.environ.get("STREAMER_DEBUG"):
    extra = ["-O0", "-g"]

setup(
    ext_modules=cythonize(
        [Extension("streamer._ext._core", ["streamer/_ext/_core.pyx"], extra_compile_args=extra)],
        compiler_directives={"language_level": "3"},
    ),
)
