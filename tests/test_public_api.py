"""The public surface is exactly what `rabbitflow.__all__` says."""

from __future__ import annotations

import rabbitflow
from rabbitflow import errors


def test_all_is_sorted_and_complete() -> None:
    assert rabbitflow.__all__ == sorted(rabbitflow.__all__)
    assert set(rabbitflow.__all__) == {
        "App",
        "Breaker",
        "ChannelClosed",
        "ConfigError",
        "ConnectionFailed",
        "ConnectionLost",
        "DecodeError",
        "Depends",
        "LoginRefused",
        "Message",
        "Middleware",
        "ParkedMessage",
        "Plan",
        "PublishNacked",
        "PublishTimeout",
        "RequestFailed",
        "RequestTimeout",
        "RabbitflowError",
        "Reject",
        "Retry",
        "RetryPolicy",
        "Router",
        "StateError",
        "TopologyConflict",
        "TransportError",
        "UnencodableMessage",
        "Unroutable",
        "partition",
    }
    for name in rabbitflow.__all__:
        assert getattr(rabbitflow, name) is not None


def test_errors_form_one_hierarchy_and_signals_stay_outside() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if name in {"Retry", "Reject"}:
            assert not issubclass(cls, errors.RabbitflowError)
        else:
            assert issubclass(cls, errors.RabbitflowError)
            assert cls.__doc__


def test_every_error_a_user_can_catch_is_exported() -> None:
    for name in errors.__all__:
        assert name in rabbitflow.__all__, f"rabbitflow.errors.{name} is not exported from rabbitflow"
