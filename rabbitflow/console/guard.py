"""Who may look and who may act: the operator token, sessions, and the cross-site checks.

- The token comes from the code (`console_app(token=...)`) or the environment
  (`RABBITFLOW_CONSOLE_TOKEN`); it is typed into the login form (a POST body: never a URL, so never
  in a server log or a browser history) and compared in constant time. It is never logged.
- A login opens a session: a random id in an HttpOnly, SameSite=Strict cookie, held in memory
  (a restart logs everyone out).
- Every form carries a CSRF token, an HMAC of the session id under a key drawn at start: a page
  of another site cannot read it, so cannot forge a POST. A POST must also come from this site
  (`Sec-Fetch-Site: same-origin` when the browser sends it, an `Origin` naming this host).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["COOKIE", "TOKEN_ENV", "Guard"]

TOKEN_ENV = "RABBITFLOW_CONSOLE_TOKEN"
COOKIE = "rabbitflow_console"
_SESSION_SECONDS = 12 * 3600
_MAX_SESSIONS = 1000


class Guard:
    """Sessions opened with the token, and the checks every request passes."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, float] = {}  # session id -> expiry (time.monotonic)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def __repr__(self) -> str:
        return f"Guard(token={'set' if self._token else 'none'}, sessions={len(self._sessions)})"

    def login(self, offered: str) -> str | None:
        """A new session id when `offered` is the token, else None."""
        if self._token is None or not hmac.compare_digest(offered.encode(), self._token):
            return None
        now = time.monotonic()
        for sid, expiry in list(self._sessions.items()):
            if expiry < now:
                del self._sessions[sid]
        while len(self._sessions) >= _MAX_SESSIONS:  # the oldest go first
            del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = now + _SESSION_SECONDS
        return sid

    def logout(self, sid: str | None) -> None:
        if sid is not None:
            self._sessions.pop(sid, None)

    def session(self, cookies: Mapping[str, str]) -> str | None:
        """The live session the request's cookie names, if any."""
        sid = cookies.get(COOKIE)
        if sid is None:
            return None
        expiry = self._sessions.get(sid)
        if expiry is None or expiry < time.monotonic():
            self._sessions.pop(sid, None)
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str, offered: str) -> bool:
        return hmac.compare_digest(self.csrf(sid), offered)

    @staticmethod
    def who(sid: str | None) -> str:
        """A session as the log names it: a digest, never the id (the id is the login)."""
        return "session " + hashlib.sha256(sid.encode()).hexdigest()[:8] if sid else "no session"


def same_site(headers: Mapping[str, str]) -> str | None:
    """Why a POST is refused as cross-site, or None when it may come from this site."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {fetch_site!r}"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            return "Origin is not this host"
    return None


def token_from(token: str | None) -> str | None:
    """The token given, else the environment's; an empty one counts as none."""
    chosen = token if token is not None else os.environ.get(TOKEN_ENV)
    return chosen or None
