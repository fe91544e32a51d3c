"""rabbitflow's errors and control-flow signals.

RabbitflowError
├── ConfigError           bad options, found when the decorator or App() runs
├── TopologyConflict      the broker refused a declaration (406 PRECONDITION_FAILED)
├── ConnectionFailed      no node of the cluster could be reached within the budget
│   └── LoginRefused      a node refused the user name or password (ACCESS_REFUSED)
├── PublishTimeout        a publish was not confirmed within its timeout
├── RequestTimeout        `app.request` got no reply within its timeout
├── RequestFailed         the responder failed the request for good (parked it) and said so
├── Unroutable            the broker returned a mandatory publish: no queue is bound
├── PublishNacked         the broker refused a publish (basic.nack)
├── UnencodableMessage    properties or headers that cannot be encoded or do not fit a frame
├── DecodeError           a body could not be decoded or validated (parked as decode-error)
├── StateError            a lifecycle call in the wrong state (start twice, publish before start)
└── TransportError        a broker operation failed because its channel or connection went away
    ├── ConnectionLost    the connection to the node is gone; unconfirmed outcomes are unknown
    └── ChannelClosed     the broker closed the channel (404 NOT_FOUND, 406 PRECONDITION_FAILED...)

Retry, Reject             raised by handlers to steer a delivery; not errors
"""

from __future__ import annotations

from rabbitflow import names

__all__ = [
    "ChannelClosed",
    "ConfigError",
    "ConnectionFailed",
    "ConnectionLost",
    "DecodeError",
    "LoginRefused",
    "PublishNacked",
    "PublishTimeout",
    "RabbitflowError",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "Retry",
    "StateError",
    "TopologyConflict",
    "TransportError",
    "UnencodableMessage",
    "Unroutable",
]


# A delay is a retry queue's x-message-ttl, which RabbitMQ caps.
TTL_LIMIT = (
    f"the longest delay RabbitMQ can hold a message for, {names.MAX_DELAY}s "
    f"(x-message-ttl={names.MAX_TTL_MS} ms, 2^32-1, about 49.7 days)"
)


class RabbitflowError(Exception):
    """Base class of every error rabbitflow raises."""


class ConfigError(RabbitflowError, ValueError):
    """An option of App or @app.consumer is invalid."""


class TopologyConflict(RabbitflowError):
    """The broker refused to declare an object because it exists with other arguments."""

    def __init__(self, message: str, *, kind: str = "", name: str = "", argument: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.argument = argument


class ConnectionFailed(RabbitflowError):
    """No node of the cluster accepted a connection within the budget."""


class LoginRefused(ConnectionFailed):
    """A node refused the connection's user name or password; trying again will not help."""


class PublishTimeout(RabbitflowError, TimeoutError):
    """A publish was not confirmed by the broker within its timeout."""


class RequestTimeout(RabbitflowError, TimeoutError):
    """`app.request` got no reply within its timeout (the request itself may have been handled)."""


class RequestFailed(RabbitflowError):
    """The responder of an `app.request` failed it for good (rejected, retries exhausted, an
    undecodable request...) and answered with an error reply instead of a result."""

    def __init__(self, reason: str, error: str = "", *, exception: str = "") -> None:
        what = f"{exception}: {error}" if exception and error else error or exception or "no details"
        super().__init__(f"the request failed for good ({reason}): {what}")
        self.reason = reason  # the responder's park reason: rejected, exhausted, decode-error...
        self.error = error  # the text of the responder's exception
        self.exception = exception  # its type's name


class Unroutable(RabbitflowError):
    """The broker returned a mandatory publish because no queue is bound for it."""

    def __init__(self, exchange: str, routing_key: str, reply_text: str = "NO_ROUTE") -> None:
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        super().__init__(
            f"message to {where} with routing key {routing_key!r} was returned ({reply_text}): "
            "no queue is bound for it; declare the queue/binding or check the routing key"
        )
        self.exchange = exchange
        self.routing_key = routing_key


class PublishNacked(RabbitflowError):
    """The broker answered a publish with basic.nack (it could not take responsibility)."""


class UnencodableMessage(RabbitflowError, ValueError):
    """A message's properties or headers cannot be encoded, or do not fit the broker's frame
    size; nothing of it was sent."""


class DecodeError(RabbitflowError, ValueError):
    """A body could not be decoded or validated; the delivery is parked with `decode-error`."""


class StateError(RabbitflowError, RuntimeError):
    """A lifecycle method was called in a state that does not allow it."""


class TransportError(RabbitflowError):
    """A broker operation failed because its channel or connection went away."""


class ConnectionLost(TransportError):
    """The connection to the broker node is gone; outcomes of unconfirmed work are unknown."""


class ChannelClosed(TransportError):
    """The broker closed the channel (for example 404 NOT_FOUND or 406 PRECONDITION_FAILED)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class Retry(Exception):
    """Raised by a handler: retry this delivery after `delay` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
                raise ConfigError(f"Retry(delay={delay!r}): delay must be a number of seconds >= 0")
            if not delay <= names.MAX_DELAY:  # inf too: the retry queue's x-message-ttl must fit
                raise ConfigError(f"Retry(delay={delay!r}): longer than {TTL_LIMIT}")
        super().__init__(reason or (f"retry requested (delay={delay}s)" if delay else "retry requested"))
        self.delay = delay
        self.reason = reason


class Reject(Exception):
    """Raised by a handler: park this delivery at once with `reason`."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)
        self.reason = reason
