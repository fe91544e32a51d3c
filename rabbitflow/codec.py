"""Bodies: encoding what the app publishes, decoding what its handlers receive."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from typing import Any

import orjson

from rabbitflow.errors import ConfigError, DecodeError, UnencodableMessage
from rabbitflow.transport.base import Properties

__all__ = ["Reader", "check_size", "decode", "encode", "outgoing", "reader_for"]

JSON = "application/json"
TEXT = "text/plain"
BINARY = "application/octet-stream"


def encode(body: object, content_type: str | None = None) -> tuple[bytes, str]:
    """Bytes and content type for `body`: dict/list/dataclass/pydantic model → JSON, str → text,
    bytes as is."""
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


def check_size(data: bytes, limit: int, what: str) -> None:
    """`UnencodableMessage` for a body over the broker's maximum message size: RabbitMQ would close
    the channel for it (4.0: "message size N is larger than configured max size 16777216")."""
    if len(data) > limit:
        raise UnencodableMessage(
            f"{what}: a body of {len(data)} bytes is over max_message_size={limit} "
            "(RabbitMQ's max_message_size: 16 MiB by default from 4.0); nothing was sent. Send a "
            "reference to the data (an object store key) instead, or raise both limits"
        )


def _to_json(value: object) -> object:
    """What orjson cannot encode itself (it does dict, list, dataclass, datetime, UUID, enum):
    a pydantic model by its aliases, as `model_validate` reads it back, and with pydantic
    installed anything its JSON mode knows (Decimal, set, Path, ...). Never on the dict, str
    and bytes path."""
    dump = getattr(value, "model_dump", None)  # pydantic v2
    if callable(dump):
        return dump(mode="json", by_alias=True)
    try:
        from pydantic_core import to_jsonable_python
    except ImportError:
        raise TypeError(f"type {type(value).__name__} is not JSON serializable") from None
    try:
        return to_jsonable_python(value, by_alias=True)
    except ValueError:  # PydanticSerializationError: a type pydantic does not know either
        raise TypeError(f"type {type(value).__name__} is not JSON serializable") from None


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
    parameter asks for; each body is read once, and only as far as the handler needs.

    An annotation that names a pydantic model, a dataclass or a TypedDict, also inside
    `list[...]`, `dict[str, ...]`, `Optional`/`Union` or `Annotated`, is validated and converted
    by a pydantic `TypeAdapter` built here, once per handler. Without pydantic a dataclass is
    built from the JSON object's top-level keys and a TypedDict must be a JSON object with its
    required keys; nothing else is checked (docs/index.md, "Validated bodies")."""
    if annotation is bytes:
        return _raw
    if annotation is str:
        return _text
    if not _structured_type(annotation):
        return decode  # unannotated, Any, object, dict, list[int]...: decoded by content type
    adapter = _type_adapter(annotation)
    if adapter is not None:
        return _validating_reader(adapter, _type_name(annotation))
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _dataclass_reader(annotation)
    if _is_typeddict(annotation):
        return _typeddict_reader(annotation)  # type: ignore[arg-type]
    return _json_reader(_type_name(annotation))


def _structured_type(annotation: object, depth: int = 0) -> bool:
    """Does `annotation` name a model, a dataclass or a TypedDict, at any depth?"""
    if isinstance(annotation, type):
        return (
            dataclasses.is_dataclass(annotation)
            or callable(getattr(annotation, "model_validate", None))  # pydantic v2 model
            or _is_typeddict(annotation)
        )
    return depth < 10 and any(_structured_type(arg, depth + 1) for arg in typing.get_args(annotation))


def _is_typeddict(annotation: object) -> bool:
    # typing.is_typeddict misses typing_extensions.TypedDict (what pydantic needs on 3.11).
    return (
        isinstance(annotation, type)
        and issubclass(annotation, dict)
        and hasattr(annotation, "__required_keys__")
        and hasattr(annotation, "__total__")
    )


def _type_name(annotation: object) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return re.sub(r"\b[\w.]+\.(?=\w)", "", repr(annotation))  # list[app.models.Line] -> list[Line]


def _type_adapter(annotation: object) -> Any:
    """A complete pydantic TypeAdapter for `annotation`, or None without pydantic. Imported here,
    so that `import rabbitflow` never pays for pydantic."""
    try:
        from pydantic import TypeAdapter
    except ImportError:
        return None
    name = _type_name(annotation)
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)  # type: ignore[arg-type]
    except Exception as exc:
        raise ConfigError(f"pydantic cannot validate {name}: {_describe(exc)}") from None
    if not getattr(adapter, "pydantic_complete", True):  # a forward reference not yet defined
        raise ConfigError(
            f"pydantic cannot validate {name} yet: a type it refers to is not defined; define "
            "every type of the body before the handler"
        )
    return adapter


def _validating_reader(adapter: Any, name: str) -> Reader:
    validate_json = adapter.validate_json

    def read(body: bytes, content_type: str | None) -> Any:
        # The body as JSON whatever its content type says, parsed and validated in one pass; a
        # text body first by its charset (a charset that fails is said as such).
        text = decode(body, content_type) if content_type and content_type.startswith("text/") else body
        return _build(name, validate_json, text, keywords=False)

    return read


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


# -- without pydantic -------------------------------------------------------------------------


def _dataclass_reader(cls: type) -> Reader:
    """The dataclass from the JSON object's top-level keys (unknown keys ignored, as pydantic
    does); values are neither checked nor converted, nested dataclasses stay dicts."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}

    def read(body: bytes, content_type: str | None) -> Any:
        value = _object(body, content_type, cls.__qualname__)
        return _build(cls.__qualname__, cls, {k: v for k, v in value.items() if k in fields})

    return read


def _typeddict_reader(cls: type[dict[str, Any]]) -> Reader:
    """A JSON object with the TypedDict's required keys; values are not checked."""
    required = sorted(getattr(cls, "__required_keys__", ()))

    def read(body: bytes, content_type: str | None) -> Any:
        value = _object(body, content_type, cls.__qualname__)
        missing = [key for key in required if key not in value]
        if missing:
            raise DecodeError(f"invalid {cls.__qualname__}: missing key(s) {', '.join(missing)}")
        return value

    return read


def _json_reader(name: str) -> Reader:
    def read(body: bytes, content_type: str | None) -> Any:
        return _structured(body, content_type, name)

    return read


def _object(body: bytes, content_type: str | None, name: str) -> dict[str, Any]:
    value = _structured(body, content_type, name)
    if not isinstance(value, dict):
        raise DecodeError(f"expected a JSON object for {name}, got {type(value).__name__}")
    return value


def _build(what: str, make: Callable[..., Any], value: Any, *, keywords: bool = True) -> Any:
    """`make(**value)` (a dataclass) or `make(value)` (a model's validation): whatever the user's
    code raises there (a validator's TypeError, a __post_init__'s anything) is the body's fault."""
    try:
        return make(**value) if keywords else make(value)
    except KeyboardInterrupt:  # a signal that landed here, not the body's doing
        raise
    except BaseException as exc:  # synchronous user code: never a cancellation of our own
        if isinstance(exc, ValueError) and hasattr(exc, "errors"):  # pydantic.ValidationError
            raise DecodeError(_validation_errors(what, exc)) from None
        kind = "" if type(exc) in (TypeError, ValueError) else f"{type(exc).__name__}: "
        raise DecodeError(f"cannot build {what}: {kind}{_describe(exc)}") from None


def _validation_errors(what: str, exc: Any) -> str:
    """A pydantic ValidationError in one line: where in the body, what is wrong, what came."""
    try:
        errors = exc.errors(include_url=False)
    except Exception:
        return f"invalid {what}: {_describe(exc)}"
    if len(errors) == 1 and errors[0].get("type") == "json_invalid":
        return f"invalid JSON body for {what}: {errors[0].get('msg', '')}"[:1000]
    parts = []
    for error in errors[:10]:
        loc = ".".join(str(part) for part in error.get("loc", ()))
        msg = " ".join(str(error.get("msg", "")).removeprefix("Value error, ").split())  # one line
        text = f"{loc}: {msg}" if loc else msg
        if loc and not isinstance(error.get("input"), dict | list):
            text += f" (got {_short(error.get('input'))})"
        parts.append(text)
    more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
    return f"invalid {what}: {'; '.join(parts)}{more}"[:1000]


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        return "?"
    return text if len(text) <= 60 else f"{text[:57]}..."


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)[:1000]
    except Exception:
        return "<str() failed>"
