"""Hit counters: how many packets and bytes each managed rule and list entry matched, read
once a minute.

Every kernel backend counts per rule (:class:`.RuleCounters`; the memory backend has no
kernel and publishes no counts); :meth:`~.RuleCounters.hits` reads them in one dump that
holds the worker's loop in proportion to the rules. So the worker reads them every
:data:`EVERY_BEATS` heartbeat intervals (no knob that only tests use), publishes the
:data:`TOP_RULES` busiest in ``{pushfw}:hits:<host>`` (replaced whole in one ``MULTI``),
and, on a backend whose lists count per entry (:class:`.ListCounters`), each list's sums
and its :data:`~pushfw.producer.records.TOP_LIST_ENTRIES` busiest entries in
``{pushfw}:list-hits:<host>`` in the same ``MULTI``; the lists' dump is part of the same
reading, so the pacing below covers it. And :class:`HitsReader` keeps a reading from
holding a timed rule past its expiry (I5): it waits for a gap between expiries, spaces
readings out past :data:`MAX_SHARE` of the loop's time, and stops past ``hits_max_rules``
(rules, and apart from them list entries). What a reading costs: docs/benchmarks.md,
"Measurements behind the code".
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import redis

from pushfw.producer.connection import untyped
from pushfw.producer.contract import Action
from pushfw.producer.keys import Keys
from pushfw.producer.records import TOP_LIST_ENTRIES, ListHits, RuleHits
from pushfw.worker.backends.base import Backend, EntryHits, ListCounters, RuleCounters, RuleKey
from pushfw.worker.errors import TransientBackendError
from pushfw.worker.heap import LARGE, give_back_memory
from pushfw.worker.metrics import Metrics

logger = logging.getLogger(__name__)

EVERY_BEATS = 12
"""Hits are read every this many heartbeat intervals: every 60 s at the default 5 s."""
TOP_RULES = 1_000
"""Rules published per host, the most packets first: the hash stays small at any rule count."""

QUIET_MARGIN_S = 0.5
"""Room beyond the read's own expected duration before the next timed rule is due."""
MAX_SHARE = 0.01
"""The most of the worker's time readings take: the interval grows with a reading's cost."""

Hits = Mapping[RuleKey, tuple[int, int]]


def interval_s(heartbeat_interval_s: float) -> float:
    """Seconds between two readings for a worker beating every ``heartbeat_interval_s``."""
    return EVERY_BEATS * heartbeat_interval_s


def busiest(hits: Hits, count: int = TOP_RULES) -> list[tuple[RuleKey, tuple[int, int]]]:
    """The ``count`` rules with the most packets (then bytes, then rule order), most first."""
    return heapq.nsmallest(count, hits.items(), key=lambda kv: (-kv[1][0], -kv[1][1], str(kv[0])))


def totals(hits: Hits) -> dict[Action, tuple[int, int]]:
    """Packets and bytes summed per action, every action present."""
    sums = dict.fromkeys(Action, (0, 0))
    for key, (packets, octets) in hits.items():
        total_packets, total_bytes = sums[key.action]
        sums[key.action] = (total_packets + packets, total_bytes + octets)
    return sums


def list_record(entries: EntryHits, now_ms: int) -> ListHits:
    """One list's sums over every entry that matched, and its busiest entries."""
    top = heapq.nsmallest(
        TOP_LIST_ENTRIES, entries.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0])
    )
    return ListHits(
        packets=sum(p for p, _ in entries.values()),
        bytes=sum(b for _, b in entries.values()),
        ms=now_ms,
        entries=[(entry, p, b) for entry, (p, b) in top],
    )


def publish_hits(
    client: redis.Redis,
    keys: Keys,
    host: str,
    counters: RuleCounters | None,
    now_ms: int,
    metrics: Metrics | None = None,
    kernel: Callable[[], AbstractContextManager[None]] = nullcontext,
    lists: ListCounters | None = None,
    rules: bool = True,
) -> int | None:
    """Read the backend's hit counters and replace this host's hash with the busiest rules.

    Args:
        client: the worker's Redis client.
        keys: the key names under the worker's prefix.
        host: this host's name (the hash is ``keys.hits(host)``).
        counters: the opened backend's rule counters (None: it has none, nothing is counted).
        now_ms: Redis's clock now, stored with every count.
        metrics: gets the sums per action and the reading's duration.
        kernel: a section the worker's expiry alarm must not interrupt (the kernel read).
        lists: the backend's list counters, read too (their hash is replaced whole).
        rules: read the rules' counters (else their hash goes, not left to age).

    Returns:
        How many rules were published; None when the kernel was busy (read next time).

    Raises:
        BackendError: the kernel could not be read.
        redis.RedisError: the hash could not be written.
    """
    started = time.monotonic()
    try:
        with kernel():
            hits, per_list = _read(counters if rules else None, lists)
    except TransientBackendError as exc:
        logger.debug("hit counters not read (%s); next reading in one interval", exc)
        return None
    seconds = time.monotonic() - started
    top = busiest(hits)
    fields = {
        str(key): RuleHits(packets=packets, bytes=octets, ms=now_ms).model_dump_json()
        for key, (packets, octets) in top
    }
    pipe = client.pipeline(transaction=True)  # one key: also fine on a cluster slot
    pipe.delete(keys.hits(host), keys.list_hits(host))
    if fields:
        untyped(pipe).hset(keys.hits(host), mapping=fields)
    records = {name: list_record(entries, now_ms) for name, entries in per_list.items()}
    if records:
        mapping = {name: record.model_dump_json() for name, record in records.items()}
        untyped(pipe).hset(keys.list_hits(host), mapping=mapping)
    pipe.execute()
    if metrics is not None:
        metrics.hits(totals(hits) if rules else None, seconds)
        metrics.list_hits({name: (r.packets, r.bytes) for name, r in records.items()})
    logger.debug(
        "hit counters of %d rules read in %.3f s; %d published", len(hits), seconds, len(fields)
    )
    return len(fields)


def _read(
    counters: RuleCounters | None, lists: ListCounters | None
) -> tuple[Hits, dict[str, EntryHits]]:
    """The rules' and the lists' counters, each empty where there are none to read."""
    hits = counters.hits() if counters is not None else {}
    return hits, lists.list_hits() if lists is not None else {}


class HitsReader:
    """:func:`publish_hits` for one worker, at moments when no timed rule falls due meanwhile.

    Args:
        client: the worker's Redis client.
        keys: the key names under the worker's prefix.
        host: this host's name.
        backend: the worker's backend (how many rules it holds bounds a reading).
        interval_s: seconds between readings (:func:`interval_s`), at least.
        metrics: the worker's metrics.
        kernel: a section the worker's expiry alarm must not interrupt.
        max_rules: past this many rules the counters are not read (``hits_max_rules``);
            past this many list entries, the lists' counters are not.
        lists: the backend's per-entry list counters (:func:`.list_counters_of`), if any.
        counters: the backend's per-rule counters (:func:`.rule_counters_of`), if any.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        host: str,
        backend: Backend,
        interval_s: float,
        metrics: Metrics | None = None,
        kernel: Callable[[], AbstractContextManager[None]] = nullcontext,
        max_rules: int = 100_000,
        lists: ListCounters | None = None,
        counters: RuleCounters | None = None,
    ) -> None:
        self.client, self.keys, self.host, self.backend = client, keys, host, backend
        self.lists = lists
        self.counters = counters
        self.every_s = interval_s
        self.max_rules = max_rules
        self._skipping = False
        self.metrics = metrics
        self.kernel = kernel
        self.read_s = 0.0
        """How long the last reading took."""
        self._waiting_since: float | None = None

    @property
    def interval_s(self) -> float:
        """Seconds from one reading to the next: the heartbeat's multiple, or more at scale."""
        return max(self.every_s, self.read_s / MAX_SHARE)

    def clear(self, ms_until_expiry: int | None) -> bool:
        """Is there room for a reading before the next expiry (or has it waited too long)?"""
        room_s = 2 * self.read_s + QUIET_MARGIN_S
        if ms_until_expiry is None or ms_until_expiry >= room_s * 1000:
            return True
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        return now - self._waiting_since >= self.every_s

    def publish(self, now_ms: int) -> int | None:
        """Read and publish now (see :func:`publish_hits`), unless the backend holds more
        than ``max_rules``: then None, and the host's hash is removed, not left to age (so
        for the lists' counters past ``max_rules`` list entries)."""
        rules = len(self.backend.committed())
        entries = 0 if self.lists is None else self.lists.held_entries()
        read_rules = rules <= self.max_rules
        lists = self.lists if entries <= self.max_rules else None
        skipping = not read_rules or lists is not self.lists
        if skipping and not self._skipping:
            logger.info(
                "hit counters are not read at %d rules or %d list entries (hits_max_rules %d)",
                rules,
                entries,
                self.max_rules,
            )
        self._skipping = skipping
        if not read_rules and lists is None:
            self.client.delete(self.keys.hits(self.host), self.keys.list_hits(self.host))
            return None
        started = time.monotonic()
        try:
            published = publish_hits(
                self.client,
                self.keys,
                self.host,
                self.counters,
                now_ms,
                self.metrics,
                self.kernel,
                lists,
                rules=read_rules,
            )
            return published if read_rules else None
        finally:
            self.read_s = time.monotonic() - started
            self._waiting_since = None
            if rules >= LARGE:
                give_back_memory()
