"""When the client asks again: the backoff of :class:`RetryPolicy` and the server's ``Retry-After`` header.

Connection errors and the answers in :data:`RETRY_STATUSES` are retried with exponential backoff and jitter, a
bounded number of times; a ``Retry-After`` header, in seconds or as an HTTP date, replaces the computed delay.
Pure functions of their inputs (the random source is passed in), so tests need no clock.
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime

# Answers that mean "not now, ask again": not ready yet, or the queue is full.
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: delay ``initial_s * 2**n`` capped at ``max_delay_s``, less up to
    ``jitter`` of itself at random; a ``Retry-After`` header replaces the delay (capped at ``max_retry_after_s``).
    ``attempts`` counts the first try."""

    attempts: int = 8
    initial_s: float = 0.5
    max_delay_s: float = 10.0
    jitter: float = 0.5
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts}: must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter={self.jitter}: must be within 0..1")

    def delay(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        base = min(self.max_delay_s, self.initial_s * 2**retry)
        return base * (1 - self.jitter * rng.random())


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
