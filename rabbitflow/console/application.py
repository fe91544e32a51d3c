"""The console as an ASGI app: routes, access rules, and the calls into `app.admin()`.

Paths, under wherever it is mounted (`/console` by `rabbitflow run --console`):

    GET  /                  the service: connection, consumers' health, rates, parked counts
    GET  /parked?queue=Q    Q's parking lot: groups (reason, exception) and the first messages
    GET  /group?queue=Q&reason=R&exception=E            one group's messages
    GET  /message?queue=Q&id=ID (or &position=N)        one message: body, headers, traceback
    GET  /confirm?queue=Q&action=replay|purge&...       how many it will touch (a dry run)
    POST /act               do it, touching no more than were confirmed
    GET|POST /login, POST /logout, GET /console.css

Replay and purge are the CLI's own calls (`Admin.replay_parked` / `purge_parked`), so they
keep every guarantee of `rabbitflow parked replay|purge`. One walk at a time per parking queue
(in this process): a look and a replay on one queue never race for its messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from rabbitflow.console.charts import chart, sparkline
from rabbitflow.console.guard import COOKIE, Guard, same_site, token_from
from rabbitflow.console.pages import (
    CSS,
    Layout,
    confirm_page,
    done_page,
    group_page,
    login_page,
    message_page,
    overview_page,
    parked_page,
    problem_page,
)
from rabbitflow.console.rates import Rates
from rabbitflow.console.request import FormTooLarge, Request, TooManyFields, read_form
from rabbitflow.errors import ChannelClosed, ConfigError, RabbitflowError
from rabbitflow.parking.message import Filter, Listing

if TYPE_CHECKING:
    from rabbitflow.admin import Admin
    from rabbitflow.app import App

__all__ = ["Console"]

log = logging.getLogger("rabbitflow.console")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_LIST_LIMIT = 50
_ADMIN_BUDGET = 10.0  # seconds a page waits for a broker connection before saying it has none
_LOGIN_PAUSE = 1.0  # seconds a refused login waits: guessing tokens is slow
_WORKER_ENV, _WORKERS_ENV = "RABBITFLOW_WORKER", "RABBITFLOW_WORKER_COUNT"
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" makes a form POST say Origin: null
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
]


class _Refused(Exception):
    """A request answered with an error page."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


_Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class Console:
    """The operator console of one App, as an ASGI app (see `console_app`)."""

    def __init__(
        self, app: App, *, token: str | None = None, enable_actions: bool = False, rates: Rates | None = None
    ) -> None:
        resolved = token_from(token)
        if enable_actions and resolved is None:
            raise ConfigError(
                "the console's actions need an operator token: set RABBITFLOW_CONSOLE_TOKEN "
                "(or pass token=...), or leave actions off for a read-only console"
            )
        self.app = app
        self.enable_actions = enable_actions
        self.guard = Guard(resolved)
        chosen = rates or next((m for m in app.middleware if isinstance(m, Rates)), None)
        self.rates = chosen if chosen is not None else Rates()
        self.minutes = 5
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Console({self.app.name!r}, actions={'on' if self.enable_actions else 'off'}, {self.guard!r})"

    # -- ASGI -------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise RuntimeError(f"rabbitflow.console serves HTTP, not {scope['type']!r}")
        try:
            request = Request.of(scope)
        except TooManyFields:
            body = b"too many query fields\n"
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            try:
                form = await read_form(receive) if request.method == "POST" else {}
            except FormTooLarge:
                raise _Refused(413, "Too large", "A console form is small; this one was not.") from None
            except TooManyFields:
                raise _Refused(
                    400, "Bad request", "A console form has a few fields; this one had many."
                ) from None
            status, headers, body = await self._answer(request, form)
        except _Refused as refused:
            status, headers, body = self._html(refused.status, problem_page(
                self._layout(request, None), refused.title, refused.text
            ))  # fmt: skip
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- routing ----------------------------------------------------------------------------------

    async def _answer(self, request: Request, form: dict[str, str]) -> _Answer:
        path, method = request.path, request.method
        if path == "/console.css":
            return (
                200,
                [(b"content-type", b"text/css; charset=utf-8"), (b"cache-control", b"max-age=3600")],
                CSS,
            )
        if method == "POST":
            why = same_site(request.headers)
            if why is not None:
                log.warning("console: refused a cross-site POST %s from %s: %s", path, request.client, why)
                raise _Refused(403, "Refused", f"This request came from another site ({why}).")
        sid = self.guard.session(request.cookies)
        if path == "/login":
            return await self._login(request, form, sid)
        if self.guard.has_token and sid is None:
            if method == "GET":
                return 303, [(b"location", f"{request.root}/login".encode())], b""
            raise _Refused(403, "Log in first", "This needs a session: log in with the operator token.")
        if method == "POST":
            if sid is None or not self.guard.csrf_ok(sid, form.get("csrf", "")):
                log.warning(
                    "console: refused a POST %s from %s without a valid form token", path, request.client
                )
                raise _Refused(
                    403, "Refused", "The form token is missing or stale: reload the page and try again."
                )
            if path == "/logout":
                self.guard.logout(sid)
                return 303, [(b"location", f"{request.root}/login".encode()), _clear(request.root)], b""
            if path == "/act":
                return await self._act(request, form, sid)
            raise _Refused(404, "Not found", f"Nothing to post to at {path}.")
        if method not in ("GET", "HEAD"):
            raise _Refused(405, "Method not allowed", "Only GET and POST.")
        layout = self._layout(request, sid)
        if path == "/":
            return self._html(200, await self._overview(layout))
        if path == "/parked":
            return self._html(200, await self._parked(layout, request.query))
        if path == "/group":
            return self._html(200, await self._group(layout, request.query))
        if path == "/message":
            return self._html(200, await self._message(layout, request.query))
        if path == "/confirm":
            return self._html(200, await self._confirm(layout, request.query))
        raise _Refused(404, "Not found", f"No console page at {path}.")

    def _layout(self, request: Request, sid: str | None) -> Layout:
        worker, siblings = _workers(request)
        return Layout(
            root=request.root,
            service=self.app.name,
            csrf=self.guard.csrf(sid) if sid is not None else None,
            can_act=self.enable_actions and sid is not None,
            needs_login=self.guard.has_token and sid is None,
            worker=worker,
            siblings=siblings,
        )

    @staticmethod
    def _html(status: int, text: str) -> _Answer:
        return status, [(b"content-type", b"text/html; charset=utf-8"), *_SECURITY_HEADERS], text.encode()

    # -- sessions ---------------------------------------------------------------------------------

    async def _login(self, request: Request, form: dict[str, str], sid: str | None) -> _Answer:
        layout = self._layout(request, sid)
        if request.method != "POST":
            return self._html(200, login_page(layout, None, self.guard.has_token))
        new = self.guard.login(form.get("token", ""))
        if new is None:
            log.warning("console: refused a login from %s (wrong or no token)", request.client)
            await asyncio.sleep(_LOGIN_PAUSE)
            return self._html(
                403, login_page(layout, "That is not the operator token.", self.guard.has_token)
            )
        log.info("console: %s logged in from %s", Guard.who(new), request.client)
        secure = "; Secure" if request.scheme == "https" else ""
        cookie = f"{COOKIE}={new}; Path={request.root or '/'}; HttpOnly; SameSite=Strict{secure}"
        return 303, [(b"location", f"{request.root}/".encode()), (b"set-cookie", cookie.encode())], b""

    # -- reading ----------------------------------------------------------------------------------

    def _admin(self) -> Admin:
        admin = self.app.admin()
        admin.budget = min(admin.budget, _ADMIN_BUDGET)
        return admin

    def _lock(self, queue: str) -> asyncio.Lock:
        return self._locks.setdefault(queue, asyncio.Lock())

    def _queue(self, query: Mapping[str, str]) -> str:
        queue = query.get("queue", "")
        consumed = [c.queue for c in self._admin().plan.consumers]
        if queue not in consumed:
            raise _Refused(404, "No such queue", f"{self.app.name} has no consumer on queue {queue!r}.")
        return queue

    async def _overview(self, layout: Layout) -> str:
        health = self.app.health()
        plan = self._admin().plan
        source = "middleware" if self.rates in self.app.middleware else "snapshots"
        if source == "snapshots":
            self.rates.snapshot(health)
        known = {str(c.get("queue")) for c in health.get("consumers", ())}
        missing = [{"queue": c.queue, "subscribed": False} for c in plan.consumers if c.queue not in known]
        health = {**health, "consumers": [*health.get("consumers", ()), *missing]}
        queues = [c.queue for c in plan.consumers]
        parked = await self._parked_counts(queues, {q.name for q in plan.queues if q.role == "parked"})
        sparks = {q: sparkline(_total(self.rates.series(q, minutes=self.minutes))) for q in queues}
        drawn = chart(self.rates.series(minutes=self.minutes), minutes=self.minutes)
        return overview_page(layout, health, parked, drawn, sparks, self.minutes, source)

    async def _parked_counts(self, queues: list[str], parking: set[str]) -> dict[str, int | str]:
        """How many messages each consumer's parking queue holds (a passive declare: nothing moves)."""
        counts: dict[str, int | str] = {}
        try:
            async with self._admin().connection() as transport:
                channel = await transport.channel()
                for queue in queues:
                    name = f"{queue}.parked"  # SPEC §3: a consumer of Q parks in Q.parked
                    if name not in parking:
                        counts[queue] = "no parking queue"
                        continue
                    try:
                        counts[queue] = (await channel.declare_queue(name, passive=True)).message_count
                    except ChannelClosed:  # 404: not declared yet; the channel is gone with it
                        counts[queue] = "not declared"
                        channel = await transport.channel()
                await channel.close()
        except RabbitflowError as exc:
            return dict.fromkeys(queues, f"broker unreachable: {exc}")
        return counts

    async def _parked(self, layout: Layout, query: Mapping[str, str]) -> str:
        queue = self._queue(query)
        async with self._lock(queue):
            listing = await _call(self._admin().list_parked(queue, limit=_LIST_LIMIT))
        return parked_page(layout, queue, listing)

    async def _group(self, layout: Layout, query: Mapping[str, str]) -> str:
        queue = self._queue(query)
        reason, exception = query.get("reason", ""), query.get("exception", "")
        chosen = _filter(reason=reason, exception=exception)
        async with self._lock(queue):
            listing = await _call(self._admin().list_parked(queue, filter=chosen, limit=_LIST_LIMIT))
        return group_page(layout, queue, reason, exception, _exact(listing, reason, exception))

    async def _message(self, layout: Layout, query: Mapping[str, str]) -> str:
        queue = self._queue(query)
        admin = self._admin()
        async with self._lock(queue):
            if query.get("id"):
                found = await _call(admin.show_parked(queue, filter=_filter(message_id=query["id"])))
            else:
                position = _whole(query.get("position", "0"), "position")
                head = await _call(admin.list_parked(queue, limit=position + 1))
                found = head.messages[position] if position < len(head.messages) else None
        if found is None:
            raise _Refused(404, "Not parked", f"No such message is parked for {queue} (any more).")
        return message_page(layout, queue, found)

    # -- acting -----------------------------------------------------------------------------------

    def _chosen(self, fields: Mapping[str, str]) -> tuple[str, str, Filter, str]:
        action = fields.get("action", "")
        if action not in ("replay", "purge"):
            raise _Refused(400, "Bad request", f"Unknown action {action!r}: replay or purge.")
        reason, exception, message_id = (fields.get(k, "") for k in ("reason", "exception", "id"))
        what = ", ".join(
            f"{name} {value}"
            for name, value in (("reason", reason), ("exception", exception), ("message id", message_id))
            if value
        )
        chosen = _filter(reason=reason, exception=exception, message_id=message_id)
        return action, what or "all of them", chosen, self._queue(fields)

    async def _confirm(self, layout: Layout, query: Mapping[str, str]) -> str:
        if not layout.can_act:
            raise _Refused(403, "Read-only", "Actions are not enabled on this console.")
        action, what, chosen, queue = self._chosen(query)
        admin = self._admin()
        method = admin.replay_parked if action == "replay" else admin.purge_parked
        async with self._lock(queue):
            outcome = await _call(method(queue, filter=chosen, dry_run=True))
        fields = {k: query.get(k, "") for k in ("queue", "action", "reason", "exception", "id")}
        return confirm_page(layout, queue, action, what, outcome, fields)

    async def _act(self, request: Request, form: dict[str, str], sid: str) -> _Answer:
        if not self.enable_actions:
            raise _Refused(403, "Read-only", "Actions are not enabled on this console.")
        action, what, chosen, queue = self._chosen(form)
        expected = _whole(form.get("expected", ""), "expected")
        admin = self._admin()
        method = admin.replay_parked if action == "replay" else admin.purge_parked
        async with self._lock(queue):
            outcome = await _call(method(queue, filter=chosen, limit=expected))
        log.info(
            "console: %s %s %d of %d parked message(s) of %r (%s; confirmed %d; groups %s), from %s",
            Guard.who(sid),
            "replayed" if action == "replay" else "purged",
            outcome.done,
            outcome.found,
            queue,
            what,
            expected,
            [(g.reason, g.exception, g.count) for g in outcome.groups],
            request.client,
        )
        return self._html(200, done_page(self._layout(request, sid), queue, action, outcome, expected))


async def _call(work: Awaitable[Any]) -> Any:
    """An admin call, its errors as pages: the broker's (unreachable, refused) and the operator's."""
    try:
        return await work
    except ConfigError as exc:
        raise _Refused(400, "Cannot do that", str(exc)) from None
    except RabbitflowError as exc:
        raise _Refused(503, "The broker did not answer", str(exc)) from None


def _filter(*, reason: str = "", exception: str = "", message_id: str = "") -> Filter:
    try:
        return Filter(reason=reason or None, exception=exception or None, message_id=message_id or None)
    except ConfigError as exc:
        raise _Refused(400, "Bad filter", str(exc)) from None


def _exact(listing: Listing, reason: str, exception: str) -> Listing:
    """A group page shows its group only: a Filter without an exception (a group the broker
    dead-lettered has none) matches every exception of the reason."""
    groups = [g for g in listing.groups if g.reason == reason and g.exception == exception]
    messages = [m for m in listing.messages if m.reason == reason and m.exception == exception]
    return Listing(listing.queue, sum(g.count for g in groups), groups, messages)


def _whole(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise _Refused(400, "Bad request", f"{what} must be a whole number >= 0, not {text[:20]!r}")
    return value


def _total(series: Mapping[str, list[float]]) -> list[float]:
    columns = list(series.values())
    return [sum(values) for values in zip(*columns, strict=True)] if columns else []


def _clear(root: str) -> tuple[bytes, bytes]:
    return b"set-cookie", f"{COOKIE}=; Path={root or '/'}; HttpOnly; SameSite=Strict; Max-Age=0".encode()


def _workers(request: Request) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """Under `rabbitflow run --workers N` worker K serves on PORT + K - 1: this one's number, and
    links to the others' consoles when the supervisor says how many there are."""
    number, count = os.environ.get(_WORKER_ENV), os.environ.get(_WORKERS_ENV)
    if not number or not number.isdigit():
        return None, ()
    if not count or not count.isdigit() or request.server_port is None:
        return number, ()
    base = request.server_port - int(number) + 1
    host = request.headers.get("host", "127.0.0.1").rsplit(":", 1)[0]
    siblings = tuple(
        (f"#{k}", f"{request.scheme}://{host}:{base + k - 1}{request.root}/")
        for k in range(1, int(count) + 1)
        if str(k) != number
    )
    return f"{number} of {count}", siblings
