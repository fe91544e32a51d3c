"""Testing without a broker: an in-memory RabbitMQ on a virtual clock, and a client to drive an App."""

from rabbitflow.testing.client import Failure as Failure
from rabbitflow.testing.client import Parked as Parked
from rabbitflow.testing.client import Sent as Sent
from rabbitflow.testing.client import TestClient as TestClient
from rabbitflow.transport.memory.broker import MemoryBroker as MemoryBroker
from rabbitflow.transport.memory.broker import use_broker as use_broker

__all__ = ["Failure", "MemoryBroker", "Parked", "Sent", "TestClient", "use_broker"]
