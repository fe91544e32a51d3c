"""One HTTP request as the console reads it: path under the mount, query, headers, cookies,
and a small urlencoded form."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["MAX_FORM", "FormTooLarge", "Request", "TooManyFields", "read_form"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

MAX_FORM = 16 * 1024


class FormTooLarge(Exception):
    """A form body over MAX_FORM bytes."""


class TooManyFields(Exception):
    """A query string or form with more fields than any console page takes."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # under the console's root: "/", "/parked", ...
    root: str
    query: dict[str, str]
    headers: dict[str, str]
    cookies: dict[str, str]
    client: str
    scheme: str
    server_port: int | None

    @classmethod
    def of(cls, scope: Scope) -> Request:
        root, path = scope.get("root_path", "") or "", scope["path"]
        if root and path.startswith(root):  # servers differ on whether `path` has the mount
            path = path[len(root) :]
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}; {text}" if key == "cookie" and key in headers else text
        client = scope.get("client")
        server = scope.get("server")
        return cls(
            method=scope["method"],
            path=path or "/",
            root=root.rstrip("/"),
            query=_pairs(scope.get("query_string", b"").decode("latin-1")),
            headers=headers,
            cookies=_cookies(headers.get("cookie", "")),
            client=f"{client[0]}:{client[1]}" if client else "unknown",
            scheme=scope.get("scheme", "http"),
            server_port=server[1] if server else None,
        )


def _pairs(text: str) -> dict[str, str]:
    """The first value of each field (a repeated field cannot widen a filter)."""
    found: dict[str, str] = {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except ValueError:  # "Max number of fields exceeded"
        raise TooManyFields from None
    for key, value in pairs:
        found.setdefault(key, value)
    return found


_MAX_FIELDS = 32


def _cookies(header: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            found.setdefault(name, value)
    return found


async def read_form(receive: Receive) -> dict[str, str]:
    """An urlencoded form body, at most `MAX_FORM` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM:
            raise FormTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return _pairs(b"".join(chunks).decode("utf-8", "replace"))
