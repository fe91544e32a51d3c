"""The shop's App: it declares no consumer itself, it includes the three routers."""

from __future__ import annotations

from typing import Any

from rabbitflow import App

from . import orders, payments, shipping


def create_app(name: str, **options: Any) -> App:
    app = App(name, **options)
    for module in (orders, payments, shipping):
        app.include_router(module.router)
    return app
