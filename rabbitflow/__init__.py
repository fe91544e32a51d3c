"""rabbitflow: asyncio microservices on RabbitMQ, with broker-side delayed retries, parking
queues and cluster failover."""

from .app import App as App
from .breaker import Breaker as Breaker
from .errors import ChannelClosed as ChannelClosed
from .errors import ConfigError as ConfigError
from .errors import ConnectionFailed as ConnectionFailed
from .errors import ConnectionLost as ConnectionLost
from .errors import LoginRefused as LoginRefused
from .errors import PublishNacked as PublishNacked
from .errors import PublishTimeout as PublishTimeout
from .errors import RabbitflowError as RabbitflowError
from .errors import Reject as Reject
from .errors import RequestTimeout as RequestTimeout
from .errors import Retry as Retry
from .errors import StateError as StateError
from .errors import TopologyConflict as TopologyConflict
from .errors import TransportError as TransportError
from .errors import UnencodableMessage as UnencodableMessage
from .errors import Unroutable as Unroutable
from .message import Message as Message
from .middleware import Middleware as Middleware
from .parking import ParkedMessage as ParkedMessage
from .registry import Router as Router
from .retry import RetryPolicy as RetryPolicy
from .topology.compiler import Plan as Plan

__version__ = "0.1.0"

__all__ = [
    "App",
    "Breaker",
    "ChannelClosed",
    "ConfigError",
    "ConnectionFailed",
    "ConnectionLost",
    "LoginRefused",
    "Message",
    "Middleware",
    "ParkedMessage",
    "Plan",
    "PublishNacked",
    "PublishTimeout",
    "RabbitflowError",
    "Reject",
    "RequestTimeout",
    "Retry",
    "RetryPolicy",
    "Router",
    "StateError",
    "TopologyConflict",
    "TransportError",
    "UnencodableMessage",
    "Unroutable",
]
