# Hand-written type stub of the compiled ingest step (streamer/_ext/_ingest.pyx);
# mypy checks the Python side against it.
from collections.abc import Callable, Iterable
from typing import Self, final

from streamer._ext._core import Core
from streamer.protocol.puller_v1_pb2 import PullerEvent

@final
class Step:
    # Its arguments go to __cinit__ (no Step exists without an index), so
    # they are __new__'s, not __init__'s.
    def __new__(
        cls,
        index: Core,
        slow: Callable[[PullerEvent, dict[int, list[bytes]]], bool],
        soft_delete_field: str,
        max_document_bytes: int,
    ) -> Self: ...
    def process(self, events: Iterable[PullerEvent], pending: dict[int, list[bytes]]) -> int: ...
    def take(
        self,
    ) -> tuple[int, int, tuple[int, int, int], tuple[int, int, int], int]: ...
