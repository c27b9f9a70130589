# Hand-written type stub of the compiled fan-out (streamer/_ext/_fanout.pyx);
# mypy checks the Python side against it.

def frame_deliveries(
    subscription_ids: list[str], owners: bytes, event: bytes
) -> list[tuple[int, bytes]]: ...
