"""The replay log: positions, markers, crash recovery, retention."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import StreamerError
from streamer.protocol.puller_v1_pb2 import ChangeEvent
from streamer.puller.log import MarkerError, MarkerExpired, ReplayLog


def event(n: int, coll: str = "messages") -> ChangeEvent:
    return ChangeEvent(
        event_id=f"ev-{n}", database="app", mgo_coll=coll, mgo_doc_id=f"m-{n}",
        op_type="insert", full_doc=b'{"n": %d, "pad": "%s"}' % (n, b"x" * 100),
    )


def ids(records: list) -> list[str]:  # type: ignore[type-arg]
    return [r.event.event_id for r in records]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_append_read_roundtrip(tmp_path: Path) -> None:
    log = ReplayLog(tmp_path)
    assert (log.first_position, log.last_position) == (1, 0)
    assert log.last_source_state() is None
    assert log.append([(event(1), b"s1"), (event(2), b"s2")]) == 2
    assert log.append([(event(3), b"")]) == 3
    records = log.read(0, 10)
    assert [r.position for r in records] == [1, 2, 3]
    assert records[0].event == event(1)
    assert [r.source_state for r in records] == [b"s1", b"s2", b""]
    assert ids(log.read(1, 1)) == ["ev-2"]
    assert log.read(3, 10) == []
    assert log.last_source_state() == b""
    log.close()


def test_positions_and_state_survive_reopen(tmp_path: Path) -> None:
    log = ReplayLog(tmp_path, segment_bytes=4096)
    for n in range(1, 201):
        log.append([(event(n), b"state-%d" % n)])
    marker = log.marker(150)
    log.close()
    log = ReplayLog(tmp_path, segment_bytes=4096)
    assert len(segments(tmp_path)) > 3  # sealed segments are read back by name
    assert log.last_position == 200
    assert log.last_source_state() == b"state-200"
    assert log.position(marker) == 150
    assert log.append([(event(201), b"")]) == 201
    # Read from disk (not the cache): a fresh log whose cache is only the tail.
    assert ids(log.read(0, 1000)) == [f"ev-{n}" for n in range(1, 202)]
    assert ids(log.read(99, 3)) == ["ev-100", "ev-101", "ev-102"]
    log.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flipped"])
def test_torn_tail_is_cut_on_open(tmp_path: Path, damage: str) -> None:
    log = ReplayLog(tmp_path)
    for n in range(1, 11):
        log.append([(event(n), b"")])
    log.close()
    (active,) = [p for p in segments(tmp_path) if "-" not in p.name]
    size = active.stat().st_size
    if damage == "truncate":
        os.truncate(active, size - 5)
    elif damage == "garbage":
        with open(active, "ab") as f:
            f.write(b"\x07garbage that is not a record")
    else:
        data = bytearray(active.read_bytes())
        data[-3] ^= 0xFF
        active.write_bytes(bytes(data))
    log = ReplayLog(tmp_path)
    expected = 10 if damage == "garbage" else 9
    assert log.last_position == expected
    assert ids(log.read(0, 100)) == [f"ev-{n}" for n in range(1, expected + 1)]
    assert log.append([(event(99), b"")]) == expected + 1
    log.close()
    assert ReplayLog(tmp_path).last_position == expected + 1


def test_markers(tmp_path: Path) -> None:
    log = ReplayLog(tmp_path)
    log.append([(event(n), b"") for n in range(1, 6)])
    assert log.position(log.marker(0)) == 0
    assert log.position(log.marker(5)) == 5
    for bad in ("", "p3", "v1:3", "v2:abc:3", f"v1:{log.log_id}:x", f"v1:{log.log_id}:-1"):
        with pytest.raises(MarkerError, match="is not a marker of this Puller"):
            log.position(bad)
    with pytest.raises(MarkerError, match="from another replay log"):
        log.position("v1:000000000000:3")
    with pytest.raises(MarkerError, match="beyond the last event"):
        log.position(log.marker(6))
    with pytest.raises(ValueError):  # the builtin callers would catch
        log.position("nonsense")
    assert issubclass(MarkerError, StreamerError)
    log.close()
    # Another directory is another log.
    other = ReplayLog(tmp_path / "other")
    with pytest.raises(MarkerError, match="another replay log"):
        other.position(log.marker(1))
    other.close()


def test_retention_by_size(tmp_path: Path) -> None:
    log = ReplayLog(tmp_path, max_bytes=20_000, segment_bytes=4096)
    for n in range(1, 501):
        log.append([(event(n), b"")])
    total = sum(p.stat().st_size for p in segments(tmp_path))
    assert total <= 20_000 + 4096 + 200
    first = log.first_position
    assert 1 < first < 500
    assert log.position(log.marker(first - 1)) == first - 1
    with pytest.raises(MarkerExpired, match="older than the log's retention"):
        log.position(log.marker(first - 2))
    with pytest.raises(MarkerExpired):
        log.read(0, 10)
    assert log.read(first - 1, 1)[0].position == first
    log.close()
    assert ReplayLog(tmp_path, max_bytes=20_000, segment_bytes=4096).first_position == first


def test_retention_by_age(tmp_path: Path) -> None:
    clock = Clock()
    log = ReplayLog(tmp_path, max_age=100, clock=clock)  # segments roll every 12.5 s
    for n in range(1, 31):
        log.append([(event(n), b"")])
        clock.now += 10
    # Now is 300 s after the first append: only the last ~100 s remain.
    first = log.first_position
    assert 15 <= first <= 22
    records = log.read(first - 1, 100)
    assert records[0].appended >= clock.now - 100 - 20
    with pytest.raises(MarkerExpired):
        log.position(log.marker(1))
    log.close()
    # Retention also applies on open.
    clock.now += 1000
    log = ReplayLog(tmp_path, max_age=100, clock=clock)
    assert log.first_position > first
    assert log.last_position == 30  # the active segment is never dropped
    log.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 40)),
    st.tuples(st.just("read"), st.integers(0, 400), st.integers(1, 300)),
    st.tuples(st.just("reopen")),
), max_size=30))
def test_matches_a_list_model(ops: list[tuple[object, ...]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        model: list[ChangeEvent] = []
        log = ReplayLog(directory, segment_bytes=2048)
        for op in ops:
            if op[0] == "append":
                batch = [event(len(model) + k) for k in range(int(op[1]))]  # type: ignore[call-overload]
                assert log.append([(e, b"%d" % i) for i, e in enumerate(batch)]) == (
                    len(model) + len(batch)
                )
                model.extend(batch)
            elif op[0] == "read":
                after, limit = int(op[1]), int(op[2])  # type: ignore[call-overload]
                after = min(after, len(model))
                assert [r.event for r in log.read(after, limit)] == model[after : after + limit]
            else:
                log.close()
                log = ReplayLog(directory, segment_bytes=2048)
            assert log.last_position == len(model)
        log.close()


WRITER = textwrap.dedent("""
    import sys
    from streamer.protocol.puller_v1_pb2 import ChangeEvent
    from streamer.puller.log import ReplayLog
    log = ReplayLog(sys.argv[1], segment_bytes=16384)
    n = log.last_position
    while True:
        batch = [(ChangeEvent(event_id=f"ev-{n + k + 1}", full_doc=b"x" * 200), b"")
                 for k in range(1 + n % 7)]
        n = log.append(batch)
        print(n, flush=True)
""")


def test_kill_9_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    acknowledged = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        lines = 0
        for line in proc.stdout:
            acknowledged = int(line)
            lines += 1
            if lines == 300:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log = ReplayLog(tmp_path, segment_bytes=16384)
        assert log.last_position >= acknowledged
        records = log.read(0, 1_000_000)
        assert [r.position for r in records] == list(range(1, log.last_position + 1))
        assert ids(records) == [f"ev-{n}" for n in range(1, log.last_position + 1)]
        log.close()
