"""rabbitflow: asyncio microservices on RabbitMQ, with broker-side delayed retries, parking
queues and cluster failover."""

from rabbitflow.app import App as App
from rabbitflow.breaker import Breaker as Breaker
from rabbitflow.depends import Depends as Depends
from rabbitflow.errors import ChannelClosed as ChannelClosed
from rabbitflow.errors import ConfigError as ConfigError
from rabbitflow.errors import ConnectionFailed as ConnectionFailed
from rabbitflow.errors import ConnectionLost as ConnectionLost
from rabbitflow.errors import DecodeError as DecodeError
from rabbitflow.errors import LoginRefused as LoginRefused
from rabbitflow.errors import PublishNacked as PublishNacked
from rabbitflow.errors import PublishTimeout as PublishTimeout
from rabbitflow.errors import RabbitflowError as RabbitflowError
from rabbitflow.errors import Reject as Reject
from rabbitflow.errors import RequestFailed as RequestFailed
from rabbitflow.errors import RequestTimeout as RequestTimeout
from rabbitflow.errors import Retry as Retry
from rabbitflow.errors import StateError as StateError
from rabbitflow.errors import TopologyConflict as TopologyConflict
from rabbitflow.errors import TransportError as TransportError
from rabbitflow.errors import UnencodableMessage as UnencodableMessage
from rabbitflow.errors import Unroutable as Unroutable
from rabbitflow.message import Message as Message
from rabbitflow.middleware.base import Middleware as Middleware
from rabbitflow.parking.message import ParkedMessage as ParkedMessage
from rabbitflow.registry import Router as Router
from rabbitflow.retry import RetryPolicy as RetryPolicy
from rabbitflow.runtime.partitions import partition as partition
from rabbitflow.topology.compiler import Plan as Plan

__version__ = "0.1.0"

__all__ = [
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
    "RabbitflowError",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "Retry",
    "RetryPolicy",
    "Router",
    "StateError",
    "TopologyConflict",
    "TransportError",
    "UnencodableMessage",
    "Unroutable",
    "partition",
]
