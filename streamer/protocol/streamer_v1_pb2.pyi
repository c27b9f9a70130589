from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OperationType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_TYPE_UNSPECIFIED: _ClassVar[OperationType]
    OPERATION_TYPE_INSERT: _ClassVar[OperationType]
    OPERATION_TYPE_UPDATE: _ClassVar[OperationType]
    OPERATION_TYPE_DELETE: _ClassVar[OperationType]
OPERATION_TYPE_UNSPECIFIED: OperationType
OPERATION_TYPE_INSERT: OperationType
OPERATION_TYPE_UPDATE: OperationType
OPERATION_TYPE_DELETE: OperationType

class StreamerEvent(_message.Message):
    __slots__ = ("event_id", "database", "collection", "document_id", "operation", "document_data", "timestamp", "progress", "document_omitted")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_DATA_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_OMITTED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    database: str
    collection: str
    document_id: str
    operation: OperationType
    document_data: bytes
    timestamp: int
    progress: str
    document_omitted: bool
    def __init__(self, event_id: _Optional[str] = ..., database: _Optional[str] = ..., collection: _Optional[str] = ..., document_id: _Optional[str] = ..., operation: _Optional[_Union[OperationType, str]] = ..., document_data: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., progress: _Optional[str] = ..., document_omitted: _Optional[bool] = ...) -> None: ...

class GatewayMessage(_message.Message):
    __slots__ = ("subscribe", "unsubscribe", "heartbeat", "hello", "subscribe_batch")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_BATCH_FIELD_NUMBER: _ClassVar[int]
    subscribe: SubscribeRequest
    unsubscribe: UnsubscribeRequest
    heartbeat: Heartbeat
    hello: Hello
    subscribe_batch: SubscribeBatch
    def __init__(self, subscribe: _Optional[_Union[SubscribeRequest, _Mapping]] = ..., unsubscribe: _Optional[_Union[UnsubscribeRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., subscribe_batch: _Optional[_Union[SubscribeBatch, _Mapping]] = ...) -> None: ...

class StreamerMessage(_message.Message):
    __slots__ = ("delivery", "heartbeat_ack", "subscribe_response", "batch", "subscribe_batch_response", "caught_up", "catchup_progress")
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_BATCH_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    CATCHUP_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    delivery: EventDelivery
    heartbeat_ack: HeartbeatAck
    subscribe_response: SubscribeResponse
    batch: DeliveryBatch
    subscribe_batch_response: SubscribeBatchResponse
    caught_up: CaughtUp
    catchup_progress: CatchUpProgress
    def __init__(self, delivery: _Optional[_Union[EventDelivery, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., subscribe_response: _Optional[_Union[SubscribeResponse, _Mapping]] = ..., batch: _Optional[_Union[DeliveryBatch, _Mapping]] = ..., subscribe_batch_response: _Optional[_Union[SubscribeBatchResponse, _Mapping]] = ..., caught_up: _Optional[_Union[CaughtUp, _Mapping]] = ..., catchup_progress: _Optional[_Union[CatchUpProgress, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("subscription_id", "collection", "filters", "database", "expression", "resume_after")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    collection: str
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    database: str
    expression: str
    resume_after: str
    def __init__(self, subscription_id: _Optional[str] = ..., collection: _Optional[str] = ..., filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ..., database: _Optional[str] = ..., expression: _Optional[str] = ..., resume_after: _Optional[str] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("field", "op", "value")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    field: str
    op: str
    value: Value
    def __init__(self, field: _Optional[str] = ..., op: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("string_value", "int_value", "double_value", "bool_value", "list_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    double_value: float
    bool_value: bool
    list_value: ListValue
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., list_value: _Optional[_Union[ListValue, _Mapping]] = ...) -> None: ...

class ListValue(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class UnsubscribeRequest(_message.Message):
    __slots__ = ("subscription_id",)
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    def __init__(self, subscription_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("gateway_id", "timestamp")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    timestamp: int
    def __init__(self, gateway_id: _Optional[str] = ..., timestamp: _Optional[int] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("timestamp",)
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    timestamp: int
    def __init__(self, timestamp: _Optional[int] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("subscription_id", "success", "error", "code", "live_after", "catchup_group")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    LIVE_AFTER_FIELD_NUMBER: _ClassVar[int]
    CATCHUP_GROUP_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    success: bool
    error: str
    code: str
    live_after: str
    catchup_group: int
    def __init__(self, subscription_id: _Optional[str] = ..., success: _Optional[bool] = ..., error: _Optional[str] = ..., code: _Optional[str] = ..., live_after: _Optional[str] = ..., catchup_group: _Optional[int] = ...) -> None: ...

class EventDelivery(_message.Message):
    __slots__ = ("subscription_ids", "event")
    SUBSCRIPTION_IDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    subscription_ids: _containers.RepeatedScalarFieldContainer[str]
    event: StreamerEvent
    def __init__(self, subscription_ids: _Optional[_Iterable[str]] = ..., event: _Optional[_Union[StreamerEvent, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("gateway_id", "batch_delivery", "max_batch", "instance", "max_message_bytes", "resumes")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    batch_delivery: bool
    max_batch: int
    instance: str
    max_message_bytes: int
    resumes: bool
    def __init__(self, gateway_id: _Optional[str] = ..., batch_delivery: _Optional[bool] = ..., max_batch: _Optional[int] = ..., instance: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., resumes: _Optional[bool] = ...) -> None: ...

class DeliveryBatch(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[EventDelivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[EventDelivery, _Mapping]]] = ...) -> None: ...

class SubscribeBatch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SubscribeRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SubscribeRequest, _Mapping]]] = ...) -> None: ...

class SubscribeBatchResponse(_message.Message):
    __slots__ = ("responses", "live_after")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    LIVE_AFTER_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SubscribeResponse]
    live_after: str
    def __init__(self, responses: _Optional[_Iterable[_Union[SubscribeResponse, _Mapping]]] = ..., live_after: _Optional[str] = ...) -> None: ...

class CatchUpProgress(_message.Message):
    __slots__ = ("group", "marker", "merged_into")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MARKER_FIELD_NUMBER: _ClassVar[int]
    MERGED_INTO_FIELD_NUMBER: _ClassVar[int]
    group: int
    marker: str
    merged_into: int
    def __init__(self, group: _Optional[int] = ..., marker: _Optional[str] = ..., merged_into: _Optional[int] = ...) -> None: ...

class CaughtUp(_message.Message):
    __slots__ = ("subscription_ids", "resync_required")
    SUBSCRIPTION_IDS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    subscription_ids: _containers.RepeatedScalarFieldContainer[str]
    resync_required: bool
    def __init__(self, subscription_ids: _Optional[_Iterable[str]] = ..., resync_required: _Optional[bool] = ...) -> None: ...
