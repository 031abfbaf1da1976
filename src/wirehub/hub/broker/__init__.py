"""Brokers: where publications, history, presence and direct messages live.

One small interface (:class:`~wirehub.hub.broker.base.Broker`) and one implementation per
backend: ``memory://`` (embedded, one process), ``redis://`` and ``nats://`` (a fleet).
"""

from .base import Broker, BrokerError, BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication

__all__ = ["Broker", "BrokerError", "BrokerHandler", "HistoryPolicy", "HistoryResult", "Member", "Position", "Publication", "create_broker"]


def create_broker(url: str, *, history_max_bytes: int | None = None) -> Broker:
    """The broker for a ``--broker`` URL. ``history_max_bytes`` bounds the memory broker's
    history over all rooms (Redis and NATS keep history in the broker, bounded there)."""
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker() if history_max_bytes is None else MemoryBroker(max_bytes=history_max_bytes)
    if scheme in ("nats", "tls"):
        from .nats import NatsBroker

        return NatsBroker(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBroker

        return RedisBroker(url)
    raise BrokerError(f"unknown broker {url!r}: use memory://, redis://HOST:PORT/DB or nats://HOST:PORT")
