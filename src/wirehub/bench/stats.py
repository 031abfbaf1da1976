"""Bounded-memory latency histogram (HDR-style log-linear buckets) and percentiles.

Values are non-negative integers (the bench records nanoseconds). Values below 128 have a
bucket each; above that every power-of-two range is split into 64 equal buckets, so a value
is known to within 1/64 (1.6 %) of itself. A value up to 2**40 ns (18 minutes) needs at most
2,240 buckets, whatever the number of values recorded; larger ones are clamped. Two
histograms merge by adding their counts, which is how the results of several load
processes become one.
"""

from __future__ import annotations

import math
from typing import Iterable

SUB_BITS = 6  # 64 buckets per power of two: relative error below 1/64
_LINEAR = 2 << SUB_BITS  # 128: values below this are exact
MAX_BITS = 40
MAX_VALUE = (1 << MAX_BITS) - 1
_SIZE = ((MAX_BITS - SUB_BITS - 1) << SUB_BITS) + _LINEAR  # index of MAX_VALUE + 1


def bucket_index(value: int) -> int:
    """The bucket of a value (clamped to [0, MAX_VALUE])."""
    if value < _LINEAR:
        return value if value > 0 else 0
    if value > MAX_VALUE:
        value = MAX_VALUE
    shift = value.bit_length() - SUB_BITS - 1
    return (shift << SUB_BITS) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The smallest and largest value that fall in bucket ``index``."""
    if index < _LINEAR:
        return index, index
    shift = (index >> SUB_BITS) - 1
    low = (index - (shift << SUB_BITS)) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts of values in log-linear buckets, with the exact maximum and minimum.

    :meth:`record` is the hot path: one bucket increment and two comparisons. The count is
    the sum of the buckets and the mean is taken from bucket midpoints (within 1/128)."""

    __slots__ = ("counts", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * _SIZE
        self.min = MAX_VALUE
        self.max = -1

    def record(self, value: int, n: int = 1) -> None:
        """Add ``n`` occurrences of ``value`` (negative values count as 0)."""
        if value >= _LINEAR:
            if value > MAX_VALUE:
                value = MAX_VALUE
            shift = value.bit_length() - SUB_BITS - 1
            self.counts[(shift << SUB_BITS) + (value >> shift)] += n
        else:
            if value < 0:
                value = 0
            self.counts[value] += n
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def record_many(self, values: Iterable[int]) -> None:
        for v in values:
            self.record(v)

    def merge(self, other: "Histogram") -> "Histogram":
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def percentile(self, pct: float) -> int:
        """The value at or below which ``pct`` percent (0..100) of the values lie: the upper
        bound of the bucket that holds the rank ``ceil(pct / 100 * count)``, clamped to the
        exact min and max. 0 when nothing was recorded."""
        count = self.count
        if count == 0:
            return 0
        q = pct / 100.0
        if q <= 0:
            return self.min
        if q >= 1:
            return self.max
        rank = max(1, math.ceil(q * count - 1e-9))
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    return max(self.min, min(self.max, bucket_bounds(i)[1]))
        return self.max

    def mean(self) -> float:
        """The mean of the bucket midpoints (exact below 128, within 1/128 above)."""
        count = total = 0
        for i, c in enumerate(self.counts):
            if c:
                low, high = bucket_bounds(i)
                count += c
                total += c * (low + high) / 2
        return min(self.max, max(self.min, total / count)) if count else 0.0

    def summary(self, scale: float = 1e-6, quantiles: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float | int]:
        """count, min, mean, the percentiles (keys p50, p90, p99, p99.9) and max, each value
        multiplied by ``scale`` (default: ns to ms)."""
        count = self.count
        out: dict[str, float | int] = {"count": count}
        if count == 0:
            return out | {"min": None, "mean": None, **{_pname(q): None for q in quantiles}, "max": None}  # type: ignore[dict-item]
        out["min"] = self.min * scale
        out["mean"] = self.mean() * scale
        for q in quantiles:
            out[_pname(q)] = self.percentile(q) * scale
        out["max"] = self.max * scale
        return out

    def curve(self, scale: float = 1e-6) -> list[tuple[float, float]]:
        """(value, fraction of values at or below it) at each non-empty bucket: for plots."""
        out = []
        seen = 0
        count = self.count
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                out.append((min(bucket_bounds(i)[1], self.max) * scale, seen / count))
        return out

    # ----------------------------------------------------------------- transport

    def to_dict(self) -> dict:
        """A compact, JSON-able form: the non-empty buckets only."""
        count = self.count
        return {
            "count": count,
            "min": self.min if count else None,
            "max": self.max if count else None,
            "buckets": {str(i): c for i, c in enumerate(self.counts) if c},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Histogram":
        h = cls()
        for i, c in data.get("buckets", {}).items():
            h.counts[int(i)] += c
        if data.get("min") is not None:
            h.min = data["min"]
            h.max = data["max"]
        return h


def _pname(q: float) -> str:
    return f"p{q:g}"
