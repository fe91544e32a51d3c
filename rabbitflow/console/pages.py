"""The console's pages, rendered on the server: plain HTML, one stylesheet, inline SVG charts,
no script.

Every value shown passes through `_e` (html.escape, quotes too) or `_href` (a URL built with
urlencode, then escaped): bodies, headers, message ids, exception texts and tracebacks come from
producers and handlers nobody vetted, and must read as text, never as markup.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import orjson

from rabbitflow.parking.message import Group, Listing, ParkedMessage, WalkResult, jsonable

__all__ = [
    "CSS",
    "Layout",
    "confirm_page",
    "done_page",
    "group_page",
    "login_page",
    "message_page",
    "overview_page",
    "parked_page",
    "problem_page",
]

_e = html.escape
_BODY_SHOWN = 64 * 1024  # bytes of a body rendered; the rest is counted, not shown
_TRACEBACK = "x-rf-traceback"


@dataclass(frozen=True, slots=True)
class Layout:
    """What every page of one request knows: where the console is mounted and who is looking."""

    root: str  # the console's path prefix ("/console"), without a trailing slash
    service: str
    csrf: str | None = None  # the session's form token; None: not logged in
    can_act: bool = False  # actions enabled and this session may use them
    needs_login: bool = False  # a token is set and this request has no session
    worker: str | None = None  # "2 of 4" under `rabbitflow run --workers`
    siblings: tuple[tuple[str, str], ...] = ()  # (label, url) of the other workers' consoles

    def href(self, path: str, **params: Any) -> str:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return _e(f"{self.root}{path}" + (f"?{query}" if query else ""))

    def page(self, title: str, content: str, *, refresh: int | None = None) -> str:
        nav = [f'<a href="{self.href("/")}">overview</a>']
        if self.csrf is not None:
            nav.append(
                f'<form method="post" action="{self.href("/logout")}" class="inline">'
                f'{self.hidden()}<button class="link">log out</button></form>'
            )
        elif self.needs_login:
            nav.append(f'<a href="{self.href("/login")}">log in</a>')
        mode = "actions enabled" if self.can_act else "read-only"
        worker = f" · worker {_e(self.worker)}" if self.worker else ""
        others = "".join(f' <a href="{_e(url)}">{_e(label)}</a>' for label, url in self.siblings)
        meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
        return (
            "<!doctype html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"{meta}<title>{_e(title)} · {_e(self.service)} · rabbitflow</title>"
            f'<link rel="stylesheet" href="{self.href("/console.css")}"></head><body>'
            f'<header><span class="brand">rabbitflow</span> <strong>{_e(self.service)}</strong>'
            f'<span class="muted">{worker}{" · other workers:" + others if others else ""}</span>'
            f'<span class="mode {"act" if self.can_act else "ro"}">{mode}</span>'
            f"<nav>{' '.join(nav)}</nav></header>"
            f"<main><h1>{_e(title)}</h1>{content}</main></body></html>\n"
        )

    def hidden(self) -> str:
        return f'<input type="hidden" name="csrf" value="{_e(self.csrf or "")}">'


# -- pieces -----------------------------------------------------------------------------------------


def _or_dash(value: Any) -> str:
    return "-" if value is None or value == "" else _e(str(value))


def _yes(flag: bool, good: bool = True) -> str:
    kind = "ok" if flag == good else "bad"
    return f'<span class="pill {kind}">{"yes" if flag else "no"}</span>'


def _first_line(text: str, width: int = 120) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(heads: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller); headings are plain text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _button(layout: Layout, queue: str, action: str, label: str, **params: Any) -> str:
    """A link to the confirmation page of `action` (nothing changes before it is confirmed)."""
    if not layout.can_act:
        return ""
    href = layout.href("/confirm", queue=queue, action=action, **params)
    return f'<a class="button {_e(action)}" href="{href}">{_e(label)}</a>'


# -- pages ------------------------------------------------------------------------------------------


def overview_page(
    layout: Layout,
    health: Mapping[str, Any],
    parked: Mapping[str, int | str],
    rates_chart: str,
    sparks: Mapping[str, str],
    minutes: int,
    source: str,
) -> str:
    """The service: its connection, every consumer's health, its rates, and its parking lot."""
    facts = [
        ("state", _e(str(health.get("state")))),
        ("healthy", _yes(bool(health.get("healthy")))),
        ("connected to", _or_dash(health.get("node"))),
        ("RabbitMQ", _or_dash(health.get("server_version"))),
        ("blocked by the broker", _yes(bool(health.get("blocked")), good=False)),
        ("reconnects", _e(str(health.get("reconnects", 0)))),
    ]
    summary = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)
    rows = []
    for c in health.get("consumers", ()):
        queue = str(c.get("queue"))
        breaker = c.get("breaker")
        breaker_cell = "-"
        if isinstance(breaker, Mapping):
            state = str(breaker.get("state"))
            breaker_cell = f'<span class="pill {"ok" if state == "closed" else "bad"}">{_e(state)}</span>'
            if breaker.get("reason"):
                breaker_cell += f' <span class="muted">{_e(_first_line(str(breaker["reason"]), 60))}</span>'
        age = c.get("oldest_unsettled_age")
        count = parked.get(queue)
        parked_cell = (
            f'<a href="{layout.href("/parked", queue=queue)}">{_e(str(count))}</a>'
            if isinstance(count, int)
            else f'<span class="bad" title="{_e(str(count))}">?</span>'
        )
        rows.append(
            [
                f'<a href="{layout.href("/parked", queue=queue)}">{_e(queue)}</a>',
                _yes(bool(c.get("subscribed"))),
                _e(str(c.get("in_flight", 0))),
                "-" if age is None else f"{float(age):.1f} s",
                _yes(bool(c.get("stalled")), good=False),
                breaker_cell,
                _or_dash(c.get("last_settled")),
                _e(str(c.get("settled", 0))),
                sparks.get(queue, ""),
                parked_cell,
            ]
        )
    consumers = _table(
        [
            "queue",
            "subscribed",
            "in flight",
            "oldest unsettled",
            "stalled",
            "breaker",
            "last settled",
            "settled",
            f"rate ({minutes} min)",
            "parked",
        ],
        rows,
        "consumers",
    )
    note = (
        ""
        if source == "middleware"
        else '<p class="muted">Rates from health snapshots taken while this page is open; add '
        "<code>rabbitflow.console.Rates()</code> to <code>App(middleware=...)</code> to see every "
        "delivery by its fate.</p>"
    )
    content = (
        f'<dl class="facts">{summary}</dl>'
        f"<h2>Consumers</h2>{consumers}"
        f"<h2>Messages per second, last {minutes} minutes</h2>{rates_chart}{note}"
    )
    return layout.page("Overview", content, refresh=5)


def _group_rows(layout: Layout, queue: str, groups: Sequence[Group]) -> list[list[str]]:
    rows = []
    for g in groups:
        params = {"queue": queue, "reason": g.reason, "exception": g.exception}
        actions = _button(
            layout, queue, "replay", "replay", reason=g.reason, exception=g.exception
        ) + _button(layout, queue, "purge", "purge", reason=g.reason, exception=g.exception)
        rows.append(
            [
                f'<a href="{layout.href("/group", **params)}">{_e(str(g.count))}</a>',
                _or_dash(g.reason),
                f"<code>{_or_dash(g.exception)}</code>",
                _or_dash(g.first_failure),
                _or_dash(g.last_failure),
                f'<span class="error">{_or_dash(_first_line(g.error))}</span>',
                actions,
            ]
        )
    return rows


def _message_rows(layout: Layout, queue: str, messages: Sequence[ParkedMessage]) -> list[list[str]]:
    rows = []
    for m in messages:
        key = {"id": m.message_id} if m.message_id else {"position": m.position}
        rows.append(
            [
                _e(str(m.position)),
                f'<a href="{layout.href("/message", queue=queue, **key)}">{_or_dash(m.message_id)}</a>',
                _or_dash(m.reason),
                f"<code>{_or_dash(m.exception.rpartition('.')[2])}</code>",
                f'<span class="error">{_or_dash(_first_line(m.error))}</span>',
                _e(str(m.attempts)),
                _or_dash(m.last_failure),
                f"{len(m.body)} B",
            ]
        )
    return rows


_MESSAGE_HEADS = ["#", "message id", "reason", "exception", "error", "attempts", "last failure", "size"]


def parked_page(layout: Layout, queue: str, listing: Listing) -> str:
    """One consumer's parking lot: its groups, and the messages at its head."""
    if listing.total == 0:
        return layout.page(
            f"Parked for {queue}", f"<p>Nothing is parked in <code>{_e(listing.queue)}</code>.</p>"
        )
    all_buttons = _button(layout, queue, "replay", "replay all") + _button(
        layout, queue, "purge", "purge all"
    )
    content = (
        f"<p><strong>{listing.total}</strong> message(s) in <code>{_e(listing.queue)}</code>, "
        f"in {len(listing.groups)} group(s). {all_buttons}</p>"
        f"<h2>Groups</h2>"
        + _table(
            ["count", "reason", "exception", "first failure", "last failure", "latest error", ""],
            _group_rows(layout, queue, listing.groups),
            "groups",
        )
        + f"<h2>The first {len(listing.messages)}, head first</h2>"
        + _table(_MESSAGE_HEADS, _message_rows(layout, queue, listing.messages), "messages")
    )
    return layout.page(f"Parked for {queue}", content)


def group_page(layout: Layout, queue: str, reason: str, exception: str, listing: Listing) -> str:
    """The messages of one group (reason and exception type)."""
    buttons = _button(layout, queue, "replay", "replay this group", reason=reason, exception=exception)
    buttons += _button(layout, queue, "purge", "purge this group", reason=reason, exception=exception)
    shown = len(listing.messages)
    content = (
        f'<p><a href="{layout.href("/parked", queue=queue)}">← all parked for {_e(queue)}</a></p>'
        f'<dl class="facts"><dt>reason</dt><dd>{_or_dash(reason)}</dd>'
        f"<dt>exception</dt><dd><code>{_or_dash(exception)}</code></dd>"
        f"<dt>messages</dt><dd>{listing.total}</dd></dl>"
        f"<p>{buttons}</p>"
        + (f'<p class="muted">The first {shown} of {listing.total}.</p>' if shown < listing.total else "")
        + _table(_MESSAGE_HEADS, _message_rows(layout, queue, listing.messages), "messages")
    )
    return layout.page(f"Group {reason or '-'} / {exception.rpartition('.')[2] or '-'}", content)


def message_page(layout: Layout, queue: str, m: ParkedMessage) -> str:
    """One parked message: its failure, its headers, its body, its traceback."""
    facts = [
        ("message id", _or_dash(m.message_id)),
        ("position", _e(str(m.position))),
        ("reason", _or_dash(m.reason)),
        ("attempts", _e(str(m.attempts))),
        ("exception", f"<code>{_or_dash(m.exception)}</code>"),
        ("error", f'<span class="error">{_or_dash(m.error)}</span>'),
        ("first failure", _or_dash(m.first_failure)),
        ("last failure", _or_dash(m.last_failure)),
        ("content type", _or_dash(m.content_type)),
    ]
    headers = jsonable({k: v for k, v in m.headers.items() if k != _TRACEBACK})
    header_rows = [
        [f"<code>{_e(str(k))}</code>", f"<code>{_e(orjson.dumps(v).decode())}</code>"]
        for k, v in headers.items()
    ]
    buttons = ""
    if m.message_id:
        buttons = _button(layout, queue, "replay", "replay this message", id=m.message_id) + _button(
            layout, queue, "purge", "purge this message", id=m.message_id
        )
    elif layout.can_act:
        buttons = (
            '<span class="muted">A message without a message id is replayed or purged with its group.</span>'
        )
    body, how = _body(m.body, m.content_type)
    content = (
        f'<p><a href="{layout.href("/parked", queue=queue)}">← all parked for {_e(queue)}</a></p>'
        f'<dl class="facts">{"".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)}</dl>'
        f"<p>{buttons}</p>"
        f'<h2>Body <span class="muted">({len(m.body)} bytes, {_e(how)})</span></h2>'
        f'<pre class="body">{_e(body)}</pre>'
        f"<h2>Headers</h2>" + _table(["name", "value (JSON)"], header_rows, "headers")
    )
    if m.traceback:
        content += f'<h2>Traceback</h2><pre class="traceback">{_e(m.traceback)}</pre>'
    return layout.page(f"Message {m.message_id or '#' + str(m.position)}", content)


def _body(body: bytes, content_type: str | None) -> tuple[str, str]:
    """The body as text to show, and how it was read."""
    shown, rest = body[:_BODY_SHOWN], len(body) - _BODY_SHOWN
    tail = f"\n… {rest} more bytes not shown" if rest > 0 else ""
    try:
        text = shown.decode("utf-8")
    except UnicodeDecodeError:
        lines = [shown[i : i + 16].hex(" ") for i in range(0, min(len(shown), 4096), 16)]
        more = f"\n… {len(body) - 4096} more bytes" if len(body) > 4096 else ""
        return "\n".join(lines) + more, "binary, hex"
    if rest <= 0 and (content_type or "").startswith("application/json"):
        try:
            return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode(), "JSON"
        except orjson.JSONDecodeError:
            pass
    return text + tail, "UTF-8 text"


def confirm_page(
    layout: Layout, queue: str, action: str, what: str, outcome: WalkResult, fields: Mapping[str, str]
) -> str:
    """Says how many messages `action` will touch, and asks; the form carries that count, and the
    action touches no more than it."""
    back = f'<a href="{layout.href("/parked", queue=queue)}">cancel</a>'
    if outcome.done == 0:
        content = (
            f"<p>No parked message of <code>{_e(queue)}</code> matches {_e(what)}: nothing to do.</p>"
            f"<p>{back}</p>"
        )
        return layout.page(f"{action.capitalize()}: nothing to do", content)
    inputs = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">'
        for k, v in {**fields, "expected": str(outcome.done)}.items()
    )
    groups = _table(
        ["count", "reason", "exception", "first failure", "last failure", "latest error"],
        [
            [
                _e(str(g.count)),
                _or_dash(g.reason),
                f"<code>{_or_dash(g.exception)}</code>",
                _or_dash(g.first_failure),
                _or_dash(g.last_failure),
                f'<span class="error">{_or_dash(_first_line(g.error))}</span>',
            ]
            for g in outcome.groups
        ],
        "groups",
    )
    target = (
        f" They go back to <code>{_e(queue)}</code> only (the default exchange), starting again at attempt 1."
        if action == "replay"
        else " They are gone for good."
    )
    content = (
        f'<p class="confirm">This will {_e(action)} <strong class="count">{outcome.done}</strong> of the '
        f"{outcome.found} message(s) parked for <code>{_e(queue)}</code> ({_e(what)}).{target}</p>{groups}"
        f'<form method="post" action="{layout.href("/act")}">{layout.hidden()}{inputs}'
        f'<button class="button {_e(action)}" type="submit">{_e(action)} {outcome.done} message(s)</button>'
        f" {back}"
        "</form>"
        '<p class="muted">Messages parked after this page was drawn are not touched; no more than '
        "this many are.</p>"
    )
    return layout.page(f"{action.capitalize()} {outcome.done} message(s)?", content)


def done_page(layout: Layout, queue: str, action: str, outcome: WalkResult, expected: int) -> str:
    verb = "Replayed" if action == "replay" else "Purged"
    left = outcome.found - outcome.done
    content = (
        f'<p class="result">{verb} <strong class="count">{outcome.done}</strong> message(s) '
        f"{'to' if action == 'replay' else 'from the parking lot of'} <code>{_e(queue)}</code> "
        f"(confirmed: {expected}). {left} stay parked.</p>"
        f'<p><a href="{layout.href("/parked", queue=queue)}">back to the parking lot of {_e(queue)}</a></p>'
    )
    return layout.page(f"{verb} {outcome.done} message(s)", content)


def login_page(layout: Layout, error: str | None, has_token: bool) -> str:
    if not has_token:
        content = (
            "<p>No operator token is set, so there is nothing to log in to: the console is read-only. "
            "Set <code>RABBITFLOW_CONSOLE_TOKEN</code> (and enable actions) to replay or purge from here.</p>"
        )
        return layout.page("Log in", content)
    problem = f'<p class="bad">{_e(error)}</p>' if error else ""
    content = (
        f'{problem}<form method="post" action="{layout.href("/login")}" class="login">'
        '<label>Operator token <input type="password" name="token" autocomplete="current-password" '
        'required autofocus></label> <button class="button" type="submit">log in</button></form>'
    )
    return layout.page("Log in", content)


def problem_page(layout: Layout, title: str, text: str) -> str:
    back = f'<p><a href="{layout.href("/")}">overview</a></p>'
    return layout.page(title, f'<p class="bad">{_e(text)}</p>{back}')


CSS = (resources.files(__package__) / "console.css").read_bytes()
