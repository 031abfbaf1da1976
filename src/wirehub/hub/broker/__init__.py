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
    raise BrokerError(f"the {scheme}:// broker is not available yet; use memory://")
