"""Bodies: encoding what the app publishes, decoding what its handlers receive."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson

from .transport.base import Properties

__all__ = ["DecodeError", "Reader", "decode", "encode", "outgoing", "reader_for"]

JSON = "application/json"
TEXT = "text/plain"
BINARY = "application/octet-stream"


class DecodeError(ValueError):
    """A body could not be decoded or validated; the delivery is parked with `decode-error`."""


def encode(body: object, content_type: str | None = None) -> tuple[bytes, str]:
    """Bytes and content type for `body`: dict/list/dataclass → JSON, str → text, bytes as is."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), content_type or BINARY
    if isinstance(body, str):
        return body.encode(), content_type or f"{TEXT}; charset=utf-8"
    if content_type is not None and not content_type.startswith(JSON):
        raise TypeError(f"cannot encode {type(body).__name__} as {content_type!r}; pass bytes or str for it")
    try:
        return orjson.dumps(body, default=_to_json), JSON
    except TypeError as exc:
        raise TypeError(f"cannot encode {type(body).__name__} as JSON: {exc}") from None


def outgoing(
    body: object,
    *,
    message_id: str,
    content_type: str | None = None,
    headers: dict[str, Any] | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    persistent: bool = True,
) -> tuple[bytes, Properties]:
    """The bytes and properties of a message a producer publishes (`App.publish`, and the test
    client's outside producer): the same for both, so a test sees what production sends."""
    data, ctype = encode(body, content_type)
    properties = Properties(
        content_type=ctype,
        headers=headers or None,
        delivery_mode=2 if persistent else 1,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )
    return data, properties


def _to_json(value: object) -> object:
    dump = getattr(value, "model_dump", None)  # pydantic v2
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"type {type(value).__name__} is not JSON serializable")


def decode(body: bytes, content_type: str | None) -> Any:
    """JSON by orjson, `text/*` to str, anything else stays bytes."""
    if not content_type:
        return body
    if content_type.startswith(JSON) or content_type.endswith("+json"):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"invalid JSON body: {exc}") from None
    if content_type.startswith("text/"):
        charset = "utf-8"
        if "charset=" in content_type:
            charset = content_type.split("charset=", 1)[1].split(";", 1)[0].strip().strip('"') or charset
        try:
            return body.decode(charset)
        except LookupError:  # no such codec, or one that is no text encoding (rot13, base64)
            raise DecodeError(f"charset {charset[:100]!r} is no text encoding Python knows") from None
        except Exception as exc:  # a codec may raise UnicodeError, ValueError or anything else
            raise DecodeError(f"invalid {charset[:100]} text body: {type(exc).__name__}: {exc}") from None
    return body


Reader = Callable[[bytes, str | None], Any]


def reader_for(annotation: object) -> Reader:
    """How to turn a delivered body (bytes and content type) into what the handler's first
    parameter asks for; each body is read once, and only as far as the handler needs."""
    if annotation is bytes:
        return _raw
    if annotation is str:
        return _text
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _dataclass_reader(annotation)
    validate = getattr(annotation, "model_validate", None)  # pydantic v2 model
    if callable(validate):
        return _pydantic_reader(validate)
    return decode  # unannotated, Any, object or a type rabbitflow does not convert


def _raw(body: bytes, content_type: str | None) -> bytes:
    return body


def _text(body: bytes, content_type: str | None) -> str:
    """`text/*` by its charset; any other body as UTF-8 (JSON text, say)."""
    if content_type and content_type.startswith("text/"):
        text: str = decode(body, content_type)
        return text
    try:
        return body.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"body is not UTF-8 text: {exc}") from None


def _structured(body: bytes, content_type: str | None, what: str) -> Any:
    """The JSON value of the body, also when its content type did not say JSON."""
    value = decode(body, content_type)
    if not isinstance(value, bytes | str):
        return value
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON body for {what}: {exc}") from None


def _dataclass_reader(cls: type) -> Reader:
    names = {f.name for f in dataclasses.fields(cls) if f.init}

    def read(body: bytes, content_type: str | None) -> Any:
        value = _structured(body, content_type, cls.__name__)
        if not isinstance(value, dict):
            raise DecodeError(f"expected a JSON object for {cls.__name__}, got {type(value).__name__}")
        unknown = value.keys() - names
        if unknown:
            raise DecodeError(f"unexpected fields for {cls.__name__}: {', '.join(sorted(unknown))}")
        return _build(cls.__name__, cls, value)

    return read


def _pydantic_reader(validate: Callable[[Any], Any]) -> Reader:
    def read(body: bytes, content_type: str | None) -> Any:
        value = _structured(body, content_type, "the model")
        return _build("the model", validate, value, keywords=False)

    return read


def _build(what: str, make: Callable[..., Any], value: Any, *, keywords: bool = True) -> Any:
    """`make(**value)` (a dataclass) or `make(value)` (a model's validation): whatever the user's
    code raises there (a validator's TypeError, a __post_init__'s anything) is the body's fault."""
    try:
        return make(**value) if keywords else make(value)
    except KeyboardInterrupt:  # a signal that landed here, not the body's doing
        raise
    except BaseException as exc:  # synchronous user code: never a cancellation of our own
        if isinstance(exc, ValueError) and hasattr(exc, "errors"):  # pydantic.ValidationError
            raise DecodeError(_describe(exc)) from None
        kind = "" if type(exc) in (TypeError, ValueError) else f"{type(exc).__name__}: "
        raise DecodeError(f"cannot build {what}: {kind}{_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)[:1000]
    except Exception:
        return "<str() failed>"
