"""When a timed rule ends, and the timed rules a host holds, ordered by expiry.

A ban's expiry is absolute (:func:`expires_at`): Redis's time when the command was first
seen (:mod:`pushfw.worker.clock`) plus its ``ttl``, the same on every host and in the
ledger; it has ended from that millisecond on (:func:`expired`). A kernel that can time
elements out itself gets :func:`kernel_timeout_s` as a backstop.

Each host removes its own timed rules at the exact millisecond (Redis's clock), from the
expiry recorded with the rule in the kernel: a ban ends on time even when Redis is
unreachable and, after a restart, as soon as the index is read back. Entries are lazy: a
rule renewed or deleted since it was queued is simply skipped when its old time comes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # backends import this module for kernel_timeout_s
    from pushfw.worker.backends.base import Rule, RuleKey

__all__ = ["ExpiryQueue", "expired", "expires_at", "kernel_timeout_s"]


def expires_at(seen_ms: int, ttl_s: int | None) -> int | None:
    """A command's absolute expiry in Redis ms (None: no ttl, the rule is permanent).

    ``seen_ms`` is when Redis first saw the command (the entry id's time, or the stamp of
    an id ahead of Redis's clock), so a host that applies it late applies only what remains.
    """
    return seen_ms + ttl_s * 1000 if ttl_s else None


def expired(expires_ms: int | None, now_ms: int) -> bool:
    """Whether a rule or list with this expiry has ended by ``now_ms`` (Redis ms): from its
    expiry's millisecond on, it is applied nowhere and reported ``expired``."""
    return expires_ms is not None and expires_ms <= now_ms


def kernel_timeout_s(expires_ms: int, now_ms: int) -> int:
    """A kernel element's timeout for an expiry: seconds remaining rounded up, plus one.

    The worker deletes the element at the exact millisecond; the kernel's timeout is the
    backstop for a worker that is down. The extra second keeps the kernel from removing an
    element first whenever the worker is late by a fraction of a second (a count check
    would take that for a hand flush and reconcile). At least 1: an element must not be
    permanent because its time just ran out.
    """
    return max(1, -(-(expires_ms - now_ms) // 1000)) + 1


class ExpiryQueue:
    """A min-heap of (expires_ms, tie-breaker, rule key).

    The tie-breaker keeps keys out of the comparison: an IPv4 and an IPv6 rule expiring in
    the same millisecond would otherwise compare their networks, which raises TypeError.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, RuleKey]] = []
        self._order = itertools.count()

    def rebuild(self, rules: Iterable[Rule]) -> None:
        self._heap = [
            (r.expires_ms, next(self._order), r.key) for r in rules if r.expires_ms is not None
        ]
        heapq.heapify(self._heap)

    def push(self, rule: Rule) -> None:
        if rule.expires_ms is not None:
            heapq.heappush(self._heap, (rule.expires_ms, next(self._order), rule.key))

    def pop_due(self, now_ms: int, current: Callable[[RuleKey], Rule | None]) -> list[Rule]:
        """Rules due by ``now_ms`` that still hold the expiry they were queued with."""
        due: list[Rule] = []
        while self._heap and self._heap[0][0] <= now_ms:
            expires_ms, _, key = heapq.heappop(self._heap)
            rule = current(key)
            if rule is not None and rule.expires_ms == expires_ms:
                due.append(rule)
        return due

    def retry(self, rules: Iterable[Rule], delay_ms: int) -> None:
        """Queue rules whose removal failed again, ``delay_ms`` later than they were due."""
        for rule in rules:
            assert rule.expires_ms is not None
            heapq.heappush(self._heap, (rule.expires_ms + delay_ms, next(self._order), rule.key))

    def ms_until_next(self, now_ms: int) -> int | None:
        return self._heap[0][0] - now_ms if self._heap else None
