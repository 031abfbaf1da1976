"""Reconnect delays: exponential backoff with full jitter."""

from __future__ import annotations

import random
from typing import Callable


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[float, float], float] = random.uniform) -> float:
    """The wait before reconnect attempt ``attempt`` (0 for the first after a drop).

    Full jitter over a window that doubles each attempt: a uniformly random time in
    ``[base, min(cap, base * 2 ** (attempt + 1))]``. Never less than ``base`` (so a hub that
    refuses at once is not hammered), never more than ``cap``, and spread out so that many
    clients dropped together (a restart) do not all come back in the same instant.
    """
    base = max(0.0, base)
    cap = max(base, cap)
    high = min(cap, base * 2.0 ** min(attempt + 1, 60)) if base > 0 else cap
    return rand(base, high) if high > base else base
