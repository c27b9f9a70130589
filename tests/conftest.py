"""Shared test set-up: the compiled extensions must be the ones under test."""

import importlib.machinery

from streamer._ext import _celparse, _core, _fanout, _ingest, _subscribe

# A pure-Python stand-in or a stale build must never pass for the core.
for _module in (_core, _celparse, _fanout, _ingest, _subscribe):
    assert _module.__file__ is not None and _module.__file__.endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    ), f"{_module.__name__} is not the compiled extension: {_module.__file__}"
