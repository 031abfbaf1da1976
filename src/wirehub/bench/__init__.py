"""``wirehub bench``: a load generator that is not the bottleneck.

Modes: :mod:`.echo` (connections x pipeline x size: msgs/s and latency percentiles; the
hub's ping, line or raw echo, Redis ECHO), :mod:`.fanout` (one publisher, N subscribers:
deliveries/s, loss, end-to-end latency, a ramp of rising rates; the hub, redis pub/sub or
NATS) and :mod:`.conns` (N idle connections: the server's memory per connection). Each
reports the load processes' and the server's CPU use over the measured window
(:class:`.runner.CpuWindow`), so a reader can tell whether the load generator was the limit.
``bench/peers.py`` runs them against wirehub and its peers side by side. Load runs in worker processes (:mod:`.runner`) on uvloop with asyncio
Protocols and pre-built requests; :mod:`.stats` holds the bounded-memory histogram,
:mod:`.report` the table, JSON and plot.
"""

from .net import BenchError, parse_target
from .stats import Histogram

__all__ = ["BenchError", "Histogram", "parse_target"]
