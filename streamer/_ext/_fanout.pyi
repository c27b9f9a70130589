# Hand-written type stub of the compiled fan-out (streamer/_ext/_fanout.pyx);
# mypy checks the Python side against it.
from collections.abc import Hashable
from typing import TypeVar

_Owner = TypeVar("_Owner", bound=Hashable)

def frame_deliveries(
    subscription_ids: list[str], owners: dict[str, _Owner], event: bytes
) -> list[tuple[_Owner, bytes]]: ...
