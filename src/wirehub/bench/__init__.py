"""``wirehub bench``: a load generator that is not the bottleneck.

Modes: :mod:`.echo` (connections x pipeline x size: msgs/s and latency percentiles),
:mod:`.fanout` (one publisher, N subscribers: deliveries/s, loss, end-to-end latency, a
ramp of rising rates) and :mod:`.conns` (N idle connections: the server's memory per
connection). Load runs in worker processes (:mod:`.runner`) on uvloop with asyncio
Protocols and pre-built requests; :mod:`.stats` holds the bounded-memory histogram,
:mod:`.report` the table, JSON and plot.
"""

from .net import BenchError, parse_target
from .stats import Histogram

__all__ = ["BenchError", "Histogram", "parse_target"]
