"""Brokers: where publications, history, presence and direct messages live.

One small interface (:class:`~wirehub.hub.broker.base.Broker`) and one implementation per
backend: ``memory://`` (embedded, one process), ``redis://`` and ``nats://`` (a fleet).
"""

from .base import Broker, BrokerError, BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication

__all__ = ["Broker", "BrokerError", "BrokerHandler", "HistoryPolicy", "HistoryResult", "Member", "Position", "Publication", "create_broker"]


def create_broker(url: str) -> Broker:
    """The broker for a ``--broker`` URL."""
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker()
    if scheme in ("nats", "tls"):
        from .nats import NatsBroker

        return NatsBroker(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBroker

        return RedisBroker(url)
    raise BrokerError(f"unknown broker {url!r}: use memory://, redis://HOST:PORT/DB or nats://HOST:PORT")
