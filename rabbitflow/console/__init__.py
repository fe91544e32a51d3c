"""The operator console: a service and its parking lot in a browser.

    from rabbitflow.console import console_app
    web.mount("/console", console_app(app))            # FastAPI / Starlette: an ASGI app

`rabbitflow run --http-port PORT --console` serves it at `/console` beside `/health` and
`/metrics` (`rabbitflow.http.serve(app, port, console=console_app(app))`). Read-only unless
`enable_actions=True`, which needs an operator token (`token=` or `RABBITFLOW_CONSOLE_TOKEN`);
see docs/console.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbitflow.console.application import Console
from rabbitflow.console.rates import Rates

if TYPE_CHECKING:
    from rabbitflow.app import App

__all__ = ["Console", "Rates", "console_app"]


def console_app(
    app: App, *, token: str | None = None, enable_actions: bool = False, rates: Rates | None = None
) -> Console:
    """The console of `app` as an ASGI app, to mount anywhere (`/console` by convention).

    Args:
        app: the service it shows; its parking lot is reached through `app.admin()` on
            connections of its own, whether or not the app runs in this process.
        token: the operator token that opens a session (typed into the login page, never put in
            a URL); by default the environment's `RABBITFLOW_CONSOLE_TOKEN`. With a token every
            page needs a session; without one the pages are open and read-only.
        enable_actions: show the replay and purge buttons (each asks for a confirmation showing
            how many messages it touches). Needs a token.
        rates: where the charts' counts come from; by default a `Rates` among the app's
            middleware, else one fed by the health snapshots taken as pages are viewed.
    """
    return Console(app, token=token, enable_actions=enable_actions, rates=rates)
