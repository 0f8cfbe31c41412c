from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FaultKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAULT_KIND_UNSPECIFIED: _ClassVar[FaultKind]
    FAULT_KIND_KILL_REPLICA: _ClassVar[FaultKind]
    FAULT_KIND_KILL_RANK: _ClassVar[FaultKind]
    FAULT_KIND_SLOW: _ClassVar[FaultKind]
    FAULT_KIND_DRAIN: _ClassVar[FaultKind]
    FAULT_KIND_RESTORE: _ClassVar[FaultKind]
FAULT_KIND_UNSPECIFIED: FaultKind
FAULT_KIND_KILL_REPLICA: FaultKind
FAULT_KIND_KILL_RANK: FaultKind
FAULT_KIND_SLOW: FaultKind
FAULT_KIND_DRAIN: FaultKind
FAULT_KIND_RESTORE: FaultKind

class FaultRequest(_message.Message):
    __slots__ = ("kind", "delay_s", "rank")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    kind: FaultKind
    delay_s: float
    rank: int
    def __init__(self, kind: _Optional[_Union[FaultKind, str]] = ..., delay_s: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class FaultReply(_message.Message):
    __slots__ = ("detail",)
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    detail: str
    def __init__(self, detail: _Optional[str] = ...) -> None: ...

class RegionHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegionHealthReply(_message.Message):
    __slots__ = ("regions", "transitions")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[RegionStatus]
    transitions: _containers.RepeatedCompositeFieldContainer[HealthTransition]
    def __init__(self, regions: _Optional[_Iterable[_Union[RegionStatus, _Mapping]]] = ..., transitions: _Optional[_Iterable[_Union[HealthTransition, _Mapping]]] = ...) -> None: ...

class RegionStatus(_message.Message):
    __slots__ = ("name", "local", "available", "state", "reason", "latency_ms", "ejections")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    local: bool
    available: bool
    state: str
    reason: str
    latency_ms: float
    ejections: int
    def __init__(self, name: _Optional[str] = ..., local: _Optional[bool] = ..., available: _Optional[bool] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., latency_ms: _Optional[float] = ..., ejections: _Optional[int] = ...) -> None: ...

class HealthTransition(_message.Message):
    __slots__ = ("unix_time", "region", "state", "reason")
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    unix_time: float
    region: str
    state: str
    reason: str
    def __init__(self, unix_time: _Optional[float] = ..., region: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
