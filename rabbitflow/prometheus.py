"""Prometheus metrics for a service: the public home of `PrometheusMiddleware` (`rabbitflow[prometheus]`)."""

from rabbitflow.middleware.prometheus import PrometheusMiddleware as PrometheusMiddleware

__all__ = ["PrometheusMiddleware"]
