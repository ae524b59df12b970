"""The timed rules a host holds, ordered by expiry, so the host removes each one itself.

Each host removes its own timed rules at the exact millisecond (Redis's clock), from the
expiry recorded with the rule in the kernel: a ban ends on time even when Redis is
unreachable and, after a restart, as soon as the index is read back. Entries are lazy: a
rule renewed or deleted since it was queued is simply skipped when its old time comes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable

from pushfw.worker.backends.base import Rule, RuleKey


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
