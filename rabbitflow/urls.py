"""The cluster's nodes: parsing the URL list, masking passwords, and the order to try them in."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

from rabbitflow.errors import ConfigError

__all__ = ["DEFAULT_URL", "Endpoint", "Failover", "mask", "parse_urls", "strategy"]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
_SCHEMES = {"amqp": 5672, "amqps": 5671, "memory": 0}
# The password runs to the last "@" before the host: it may itself hold "@", ";" or "/" (never
# "://", which starts the next URL). The host ends at "/", whitespace, the end, or a ";" that
# starts the next URL of a list.
_NEXT_URL = r";(?=\s*[a-z][a-z0-9+.-]*://)"
_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@;\s]*:)(?P<password>(?:(?!://)\S)*?)"
    rf"(?=@[^@\s/;]*(?:[/\s]|{_NEXT_URL}|;?$))",
    re.I,
)
# A ";" separates two URLs only where the next one starts: inside a password it is a character.
_SEPARATOR = re.compile(_NEXT_URL, re.I)


def mask(text: str) -> str:
    """`text` with the password of every URL in it replaced by `**`."""
    return _PASSWORD.sub(r"\g<head>**", text)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One node of the cluster. `url` holds the password; `str()` and `repr()` never show it."""

    url: str = field(repr=False)
    scheme: str
    host: str
    port: int
    vhost: str
    user: str = ""

    def __str__(self) -> str:
        return mask(self.url)

    def __repr__(self) -> str:
        return f"Endpoint({mask(self.url)!r})"

    @property
    def is_memory(self) -> bool:
        return self.scheme == "memory"


def parse_urls(url: str | Sequence[str] | None) -> tuple[Endpoint, ...]:
    """Parse one URL, a `;`-separated list (kombu style) or a list; None reads RABBITFLOW_URL."""
    if url is None:
        url = os.environ.get("RABBITFLOW_URL") or DEFAULT_URL
    if isinstance(url, str):
        entries = [part.strip().removesuffix(";").strip() for part in _SEPARATOR.split(url)]
    elif isinstance(url, Sequence):
        entries = [str(part).strip() for part in url]
    else:
        raise ConfigError(f"url: expected a string or a list of strings, got {type(url).__name__}")
    entries = [entry for entry in entries if entry]
    if not entries:
        raise ConfigError("url: no broker URL given; pass url='amqp://user:pass@host:5672/'")
    endpoints = tuple(_parse_one(entry, index) for index, entry in enumerate(entries, 1))
    if any(e.is_memory for e in endpoints) and len(endpoints) > 1:
        raise ConfigError("url: memory:// selects the in-memory broker and cannot be mixed with others")
    return endpoints


def _parse_one(entry: str, index: int) -> Endpoint:
    shown = mask(entry)
    try:
        parts = urlsplit(entry)
        port = parts.port
    except ValueError:
        # urlsplit's own message may quote the password; say it in our words.
        raise ConfigError(f"url entry {index} ({shown!r}) is malformed: bad host or port") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"url entry {index} ({shown!r}): unknown scheme {parts.scheme!r}; "
            "use amqp://, amqps:// or memory://"
        )
    if scheme == "memory":
        return Endpoint(entry, scheme, "", 0, "/")
    if not parts.hostname:
        raise ConfigError(f"url entry {index} ({shown!r}) has no host; write amqp://user:pass@host:5672/")
    if ";" in parts.hostname:
        raise ConfigError(
            f"url entry {index} ({shown!r}): ';' in the host; give every node of a list its own "
            "scheme: amqp://host1;amqp://host2"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    user = unquote(parts.username or "guest")
    return Endpoint(entry, scheme, parts.hostname, port or _SCHEMES[scheme], vhost, user)


Strategy = Callable[[Sequence[Endpoint]], Iterator[Endpoint]]
Failover = Literal["round-robin", "shuffle"] | Strategy


def round_robin(endpoints: Sequence[Endpoint]) -> Iterator[Endpoint]:
    while True:
        yield from endpoints


def shuffle(endpoints: Sequence[Endpoint]) -> Iterator[Endpoint]:
    while True:
        order = list(endpoints)
        random.shuffle(order)
        yield from order


def strategy(failover: object) -> Strategy:
    if failover == "round-robin":
        return round_robin
    if failover == "shuffle":
        return shuffle
    if callable(failover):
        return failover
    raise ConfigError(
        f"failover={failover!r}: expected 'round-robin', 'shuffle' or a function that takes "
        "the list of nodes and yields them in the order to try"
    )
