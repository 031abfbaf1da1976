"""Fixtures for the hub's tests: a test parametrized with ``transport`` runs once per
transport; ``hub(**options)`` serves a HubApp with one listener of it."""

from __future__ import annotations

import pytest

from .hubclient import TRANSPORTS, hub_server


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def hub(transport, request):
    """``async with hub(**options) as h``: a HubApp with one listener of the transport."""
    certs = request.getfixturevalue("tls_certs") if transport == "tls" else None

    def start(**options):
        return hub_server(transport, certs=certs, **options)

    return start
