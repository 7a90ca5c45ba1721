"""The machine's RabbitMQ for the broker tests: its URL and the skip when it is down."""

from __future__ import annotations

import socket

import pytest

BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def broker_up() -> bool:
    """Whether something accepts connections on RabbitMQ's port on loopback."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


needs_broker = pytest.mark.skipif(
    not broker_up(),
    reason="no RabbitMQ on 127.0.0.1:5672 (start it: rabbitmq-server -detached)",
)
