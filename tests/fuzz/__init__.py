"""The standing fuzz suite: hypothesis against every decoder of peer input, and raw bytes
against a real WebSocket server.

Each test has a fixed number of examples and a per-example deadline, so the suite fits CI's
time (well under a minute in all). For a longer hunt, scale the examples up:

    WIREHUB_FUZZ_SCALE=50 scripts/test tests/fuzz

A failure prints the smallest input hypothesis found; add it as an ``@example`` (or as a
plain test beside the code it broke) when you fix it.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("WIREHUB_FUZZ_SCALE", "1")))


def fuzz(examples: int, deadline_ms: int = 1000) -> settings:
    """Settings for one fuzz test: ``examples`` (times WIREHUB_FUZZ_SCALE) and a deadline per
    example generous enough for a shared, loaded machine."""
    return settings(
        max_examples=examples * SCALE,
        deadline=timedelta(milliseconds=deadline_ms),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
