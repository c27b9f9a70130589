"""The wire protocols: committed stubs match proto/, and the fixed numbers hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.protocol import puller_v1_pb2, streamer_v1_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), str(tmp_path)], check=True
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "the generator wrote nothing"
    stale = [
        str(rel) for rel in generated
        if not (ROOT / rel).is_file() or (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"regenerate with `make proto`: {stale}"


def _numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    ("message", "numbers"),
    [
        (streamer_v1_pb2.StreamerEvent, {
            "event_id": 1, "database": 2, "collection": 3, "document_id": 4, "operation": 5,
            "document_data": 6, "timestamp": 7, "progress": 8, "document_omitted": 9}),
        (streamer_v1_pb2.GatewayMessage, {
            "subscribe": 1, "unsubscribe": 2, "heartbeat": 3, "hello": 4, "subscribe_batch": 5}),
        (streamer_v1_pb2.StreamerMessage, {
            "delivery": 1, "heartbeat_ack": 2, "subscribe_response": 3, "batch": 4,
            "subscribe_batch_response": 5, "caught_up": 6, "catchup_progress": 7}),
        (streamer_v1_pb2.SubscribeRequest, {
            "subscription_id": 1, "collection": 2, "filters": 3, "database": 4,
            "expression": 5, "resume_after": 6}),
        (streamer_v1_pb2.Filter, {"field": 1, "op": 2, "value": 3}),
        (streamer_v1_pb2.Value, {
            "string_value": 1, "int_value": 2, "double_value": 3, "bool_value": 4,
            "list_value": 5}),
        (streamer_v1_pb2.ListValue, {"values": 1}),
        (streamer_v1_pb2.UnsubscribeRequest, {"subscription_id": 1}),
        (streamer_v1_pb2.Heartbeat, {"gateway_id": 1, "timestamp": 2}),
        (streamer_v1_pb2.HeartbeatAck, {"timestamp": 1}),
        (streamer_v1_pb2.SubscribeResponse, {
            "subscription_id": 1, "success": 2, "error": 3, "code": 4, "live_after": 5,
            "catchup_group": 6}),
        (streamer_v1_pb2.EventDelivery, {"subscription_ids": 1, "event": 2}),
        (streamer_v1_pb2.Hello, {
            "gateway_id": 1, "batch_delivery": 2, "max_batch": 3, "instance": 4,
            "max_message_bytes": 5, "resumes": 6}),
        (streamer_v1_pb2.DeliveryBatch, {"deliveries": 1}),
        (streamer_v1_pb2.SubscribeBatch, {"requests": 1}),
        (streamer_v1_pb2.SubscribeBatchResponse, {"responses": 1, "live_after": 2}),
        (streamer_v1_pb2.CaughtUp, {"subscription_ids": 1, "resync_required": 2}),
        (streamer_v1_pb2.CatchUpProgress, {"group": 1, "marker": 2, "merged_into": 3}),
        (puller_v1_pb2.SubscribeRequest, {
            "consumer_id": 1, "after": 2, "coalesce_on_catch_up": 3, "collections": 4}),
        (puller_v1_pb2.PullerEvent, {"change_event": 1, "progress": 2}),
        (puller_v1_pb2.ChangeEvent, {
            "event_id": 1, "database": 2, "mgo_coll": 3, "mgo_doc_id": 4, "op_type": 5,
            "full_doc": 6, "update_desc": 7, "cluster_time": 8, "timestamp": 9,
            "txn_number": 10, "backend": 11, "before_doc": 12}),
        (puller_v1_pb2.ClusterTime, {"t": 1, "i": 2}),
        (puller_v1_pb2.PullerEventBatch, {"events": 1}),
    ],
    ids=lambda v: v.DESCRIPTOR.full_name if hasattr(v, "DESCRIPTOR") else "",
)
def test_field_numbers_are_the_compatible_ones(message: type, numbers: dict[str, int]) -> None:
    assert _numbers(message) == numbers


def test_names_and_enum_values() -> None:
    streamer = streamer_v1_pb2.DESCRIPTOR
    puller = puller_v1_pb2.DESCRIPTOR
    assert streamer.package == "syntrix.streamer.v1"
    assert puller.package == "syntrix.puller.v1"
    stream = streamer.services_by_name["StreamerService"].methods_by_name["Stream"]
    assert (stream.client_streaming, stream.server_streaming) == (True, True)
    methods = puller.services_by_name["PullerService"].methods_by_name
    assert set(methods) == {"Subscribe", "SubscribeBatch"}
    assert all(m.server_streaming and not m.client_streaming for m in methods.values())
    op = streamer.enum_types_by_name["OperationType"]
    assert [v.number for v in op.values] == [0, 1, 2, 4]
