"""Testing without a broker: an in-memory RabbitMQ on a virtual clock, and a client to drive an App."""

from .client import Failure as Failure
from .client import Parked as Parked
from .client import Sent as Sent
from .client import TestClient as TestClient
from .memory import MemoryBroker as MemoryBroker
from .memory import use_broker as use_broker

__all__ = ["Failure", "MemoryBroker", "Parked", "Sent", "TestClient", "use_broker"]
