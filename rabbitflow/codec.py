"""Bodies: encoding what the app publishes, decoding what its handlers receive."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["DecodeError", "converter_for", "decode", "encode"]

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
            charset = content_type.split("charset=", 1)[1].split(";", 1)[0].strip() or charset
        try:
            return body.decode(charset)
        except (UnicodeDecodeError, LookupError) as exc:
            raise DecodeError(f"invalid {charset} text body: {exc}") from None
    return body


Converter = Callable[[Any, bytes], Any]


def converter_for(annotation: object) -> Converter | None:
    """How to turn the decoded body into what the handler's first parameter asks for."""
    if annotation in (typing.Any, object, None) or annotation is dataclasses.MISSING:
        return None
    if annotation is bytes:
        return lambda _value, raw: raw
    if annotation is str:
        return _to_str
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _dataclass_converter(annotation)
    validate = getattr(annotation, "model_validate", None)  # pydantic v2 model
    if callable(validate):
        return _pydantic_converter(validate)
    return None


def _to_str(value: Any, raw: bytes) -> str:
    if isinstance(value, str):
        return value
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"body is not UTF-8 text: {exc}") from None


def _structured(value: Any, raw: bytes, what: str) -> Any:
    """The decoded body, or the raw body parsed as JSON when its content type did not say so."""
    if not isinstance(value, bytes | str):
        return value
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON body for {what}: {exc}") from None


def _dataclass_converter(cls: type) -> Converter:
    names = {f.name for f in dataclasses.fields(cls) if f.init}

    def convert(value: Any, raw: bytes) -> Any:
        value = _structured(value, raw, cls.__name__)
        if not isinstance(value, dict):
            raise DecodeError(f"expected a JSON object for {cls.__name__}, got {type(value).__name__}")
        unknown = value.keys() - names
        if unknown:
            raise DecodeError(f"unexpected fields for {cls.__name__}: {', '.join(sorted(unknown))}")
        try:
            return cls(**value)
        except TypeError as exc:
            raise DecodeError(f"cannot build {cls.__name__}: {exc}") from None

    return convert


def _pydantic_converter(validate: Callable[[Any], Any]) -> Converter:
    def convert(value: Any, raw: bytes) -> Any:
        value = _structured(value, raw, "the model")
        try:
            return validate(value)
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise DecodeError(str(exc)) from None

    return convert
