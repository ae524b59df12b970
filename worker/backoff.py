"""Exponential backoff with jitter, so many workers do not retry in step.

The delays are redis-py's :class:`~redis.backoff.EqualJitterBackoff` (``base_s * 2**n``
capped at ``max_s``, drawn from the upper half of that); this only counts the attempts, so
each loop that retries keeps its own streak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.backoff import EqualJitterBackoff

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """One retry streak: each :meth:`next_delay_s` waits longer, :meth:`reset` starts over."""

    base_s: float = 0.2
    max_s: float = 30.0
    attempts: int = 0
    _delays: EqualJitterBackoff = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._delays = EqualJitterBackoff(cap=self.max_s, base=self.base_s)

    def next_delay_s(self) -> float:
        delay = self._delays.compute(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
