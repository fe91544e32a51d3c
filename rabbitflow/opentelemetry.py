"""OpenTelemetry tracing: the public home of `TelemetryMiddleware` (`rabbitflow[opentelemetry]`)."""

from rabbitflow.middleware.opentelemetry import TelemetryMiddleware as TelemetryMiddleware

__all__ = ["TelemetryMiddleware"]
