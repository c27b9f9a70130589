"""Finalizers that call back into the index from inside its own operations.

The garbage collector runs finalizers wherever an allocation crosses its
threshold, which inside the compiled core means in the middle of a search,
an ``add`` or the framing of deliveries. ``Reentry`` makes that
happen on purpose: with the threshold at 1 and an object whose ``__del__``
calls ``action`` left in a reference cycle (it re-arms itself while the
operation runs), nearly every allocation of a tracked object in
``Reentry.during(operation)`` runs ``action``. Shared by the tests of the
core, the fan-out and the ingest step.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# IndexBusy's message.
BUSY = "the index is in use (re-entered from a finalizer or another thread?)"


class Reentry:
    """Counts what ``action`` got when finalizers ran it during a block."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.running = False
        self.calls = 0
        # What ``action`` raised and what Python reported as raised in a
        # finalizer, as (type, message): an exception kept alive would keep
        # its frames, and their objects allocate when those frames return.
        self.errors: list[tuple[type[BaseException], str]] = []
        self.unraisable: list[tuple[type[BaseException] | None, str]] = []

    def during(self, operation: Callable[[], T]) -> T:
        """``operation()``, with finalizers running ``action`` at nearly every
        allocation it makes (and at none outside it)."""
        threshold = gc.get_threshold()
        hook = sys.unraisablehook
        gc.collect()
        # Lists come from a free list without counting as allocations, so
        # building a result list would never collect: take them all first.
        hold = [[] for _ in range(100)]
        sys.unraisablehook = self._report
        _Finalizer(self)
        gc.set_threshold(1)
        self.running = True
        try:
            return operation()
        finally:
            self.running = False
            gc.set_threshold(*threshold)
            gc.collect()
            sys.unraisablehook = hook
            del hold

    def _report(self, unraisable: sys.UnraisableHookArgs) -> None:
        self.unraisable.append((unraisable.exc_type, str(unraisable.exc_value)))

    def _run(self) -> None:
        if not self.running:
            return
        self.calls += 1
        _Finalizer(self)
        try:
            self.action()
        except BaseException as exc:
            self.errors.append((type(exc), str(exc)))
            raise


class _Finalizer:
    def __init__(self, reentry: Reentry) -> None:
        self.reentry = reentry
        self.cycle = self

    def __del__(self) -> None:
        self.reentry._run()
