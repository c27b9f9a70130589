from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("consumer_id", "after", "coalesce_on_catch_up", "collections")
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    COALESCE_ON_CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    consumer_id: str
    after: str
    coalesce_on_catch_up: bool
    collections: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, consumer_id: _Optional[str] = ..., after: _Optional[str] = ..., coalesce_on_catch_up: _Optional[bool] = ..., collections: _Optional[_Iterable[str]] = ...) -> None: ...

class PullerEvent(_message.Message):
    __slots__ = ("change_event", "progress")
    CHANGE_EVENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    change_event: ChangeEvent
    progress: str
    def __init__(self, change_event: _Optional[_Union[ChangeEvent, _Mapping]] = ..., progress: _Optional[str] = ...) -> None: ...

class ChangeEvent(_message.Message):
    __slots__ = ("event_id", "database", "mgo_coll", "mgo_doc_id", "op_type", "full_doc", "update_desc", "cluster_time", "timestamp", "txn_number", "backend", "before_doc")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    MGO_COLL_FIELD_NUMBER: _ClassVar[int]
    MGO_DOC_ID_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    FULL_DOC_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DESC_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_TIME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TXN_NUMBER_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BEFORE_DOC_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    database: str
    mgo_coll: str
    mgo_doc_id: str
    op_type: str
    full_doc: bytes
    update_desc: bytes
    cluster_time: ClusterTime
    timestamp: int
    txn_number: int
    backend: str
    before_doc: bytes
    def __init__(self, event_id: _Optional[str] = ..., database: _Optional[str] = ..., mgo_coll: _Optional[str] = ..., mgo_doc_id: _Optional[str] = ..., op_type: _Optional[str] = ..., full_doc: _Optional[bytes] = ..., update_desc: _Optional[bytes] = ..., cluster_time: _Optional[_Union[ClusterTime, _Mapping]] = ..., timestamp: _Optional[int] = ..., txn_number: _Optional[int] = ..., backend: _Optional[str] = ..., before_doc: _Optional[bytes] = ...) -> None: ...

class ClusterTime(_message.Message):
    __slots__ = ("t", "i")
    T_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    t: int
    i: int
    def __init__(self, t: _Optional[int] = ..., i: _Optional[int] = ...) -> None: ...

class PullerEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[PullerEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[PullerEvent, _Mapping]]] = ...) -> None: ...
