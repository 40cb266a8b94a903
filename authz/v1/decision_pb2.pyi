from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecideRequest(_message.Message):
    __slots__ = ("principal", "method", "path", "host", "headers", "tenant", "destination_principal", "context_extensions")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ContextExtensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    principal: str
    method: str
    path: str
    host: str
    headers: _containers.ScalarMap[str, str]
    tenant: str
    destination_principal: str
    context_extensions: _containers.ScalarMap[str, str]
    def __init__(self, principal: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., host: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., tenant: _Optional[str] = ..., destination_principal: _Optional[str] = ..., context_extensions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("allowed", "reason", "policy", "rule", "tenant", "decision_id", "revision", "http_status", "upstream_headers")
    class UpstreamHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_HEADERS_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    policy: str
    rule: str
    tenant: str
    decision_id: str
    revision: str
    http_status: int
    upstream_headers: _containers.ScalarMap[str, str]
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., policy: _Optional[str] = ..., rule: _Optional[str] = ..., tenant: _Optional[str] = ..., decision_id: _Optional[str] = ..., revision: _Optional[str] = ..., http_status: _Optional[int] = ..., upstream_headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExplainStep(_message.Message):
    __slots__ = ("step", "ok", "policy", "rule", "detail")
    STEP_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    step: str
    ok: bool
    policy: str
    rule: str
    detail: str
    def __init__(self, step: _Optional[str] = ..., ok: _Optional[bool] = ..., policy: _Optional[str] = ..., rule: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("decision", "steps", "text")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    decision: DecideResponse
    steps: _containers.RepeatedCompositeFieldContainer[ExplainStep]
    text: str
    def __init__(self, decision: _Optional[_Union[DecideResponse, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[ExplainStep, _Mapping]]] = ..., text: _Optional[str] = ...) -> None: ...
