"""Shared test set-up: the compiled extension must be the one under test."""

import importlib.machinery

from streamer._ext import _core

# A pure-Python stand-in or a stale build must never pass for the core.
assert _core.__file__ is not None and _core.__file__.endswith(
    tuple(importlib.machinery.EXTENSION_SUFFIXES)
), f"streamer._ext._core is not the compiled extension: {_core.__file__}"
