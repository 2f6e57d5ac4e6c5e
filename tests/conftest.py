"""Fixtures several test folders share: name servers on loopback, answering and silent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from support import ANTHROPIC, dns_server


@pytest.fixture(scope="module")
def answering() -> Iterator[int]:
    with dns_server(ANTHROPIC) as port:
        yield port


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A UDP socket that takes queries and never answers: DNS down."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()
