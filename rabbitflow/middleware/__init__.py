"""Middleware: hooks around what a service consumes and publishes (`base`), and the metrics
(`prometheus`) and tracing (`opentelemetry`) middlewares built on them (extras, imported only
when asked for)."""

from rabbitflow.middleware.base import Fate as Fate
from rabbitflow.middleware.base import Middleware as Middleware
from rabbitflow.middleware.base import Outcome as Outcome
from rabbitflow.middleware.base import Outgoing as Outgoing

__all__ = ["Fate", "Middleware", "Outcome", "Outgoing"]
