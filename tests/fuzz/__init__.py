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
from hypothesis import strategies as st

SCALE = max(1, int(os.environ.get("WIREHUB_FUZZ_SCALE", "1")))


def fuzz(examples: int, deadline_ms: int = 1000) -> settings:
    """Settings for one fuzz test: ``examples`` (times WIREHUB_FUZZ_SCALE) and a deadline per
    example generous enough for a shared, loaded machine."""
    return settings(
        max_examples=examples * SCALE,
        deadline=timedelta(milliseconds=deadline_ms),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


def mutate(draw, base: bytes, byte: st.SearchStrategy[int] = st.integers(0, 255)) -> bytes:
    """``base`` with one byte (drawn from ``byte``) replaced, inserted or removed, at a drawn
    place: for a ``@st.composite`` strategy's ``draw``."""
    i = draw(st.integers(0, len(base)))
    how = draw(st.sampled_from(["replace", "insert", "delete"]))
    one = bytes([draw(byte)])
    if how == "replace" and i < len(base):
        return base[:i] + one + base[i + 1 :]
    if how == "insert":
        return base[:i] + one + base[i:]
    return base[:i] + base[i + 1 :]
