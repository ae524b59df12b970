"""Bounded memory at O(change): trim the streams, forget old tombstones, retire lost hosts.

One worker of the fleet trims per interval (a lock key, ``SET NX PX``), not every host.
The stream is trimmed (``XTRIM MINID``, with no per-call limit, so input of any rate is
kept up with) to the oldest entry still pending or undelivered in the ledger group or in
the group of a live host, or after the position of a live follower. A host silent for
longer than the host expiry no longer holds the stream back; when it returns it
reconciles from the ledger. One silent for longer than ``retire_after_s`` is retired: its
group and heartbeat are removed (``pushfw hosts forget`` does it by hand). Tombstones
older than the trim point can go: no entry that could resurrect them is left. They are
found in ``{pushfw}:tombs``, which the ledger's scripts keep, so a trim reads only what it
removes, never the whole ledger; removed and expired named lists are forgotten the same way,
and held records (:mod:`pushfw.worker.held`) once they have expired.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from pushfw.producer.client import forget_host
from pushfw.producer.connection import text
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.keys import Keys
from pushfw.producer.records import HostStatus, ListRecord, RuleRecord
from pushfw.worker.heartbeat import read_hosts
from pushfw.worker.ledger import Ledger

__all__ = ["retire", "take_turn", "trim", "trim_point"]

logger = logging.getLogger(__name__)

_PAGE = 1000


def _before(entry_id: Any, limit: tuple[int, int]) -> bool:
    return entry_order(text(entry_id)) < limit


def _next_id(entry_id: str) -> str:
    ms, seq = entry_order(entry_id)
    return f"{ms}-{seq + 1}"


def take_turn(client: redis.Redis, keys: Keys, me: str, interval_s: float) -> bool:
    """Whether this worker trims this interval: the first to ask gets it, for one interval."""
    return bool(client.set(keys.trimming, me, nx=True, px=max(1, int(interval_s * 1000))))


def trim_point(
    client: redis.Redis,
    keys: Keys,
    now_ms: int,
    host_expiry_s: float,
    hosts: list[HostStatus] | None = None,
) -> str | None:
    """The oldest id any live consumer group or follower still needs (None: nothing to trim
    by); a follower needs what is after the position its heartbeat carries."""
    if hosts is None:
        hosts = read_hosts(client, keys)
    live = {h.host for h in hosts if now_ms - h.last_seen_ms <= host_expiry_s * 1000}
    needed: list[tuple[int, int]] = []
    groups: Any = client.xinfo_groups(keys.cmd)
    for group in groups:
        name = text(group["name"])
        if name != Keys.LEDGER_GROUP and name.removeprefix("host:") not in live:
            continue
        after_last = entry_order(_next_id(text(group["last-delivered-id"])))
        summary: Any = client.xpending(keys.cmd, name) if int(group["pending"]) > 0 else {}
        oldest = summary.get("min")  # None if the pending entries were acked meanwhile
        needed.append(entry_order(text(oldest)) if oldest is not None else after_last)
    needed += (entry_order(_next_id(h.position)) for h in hosts if h.position and h.host in live)
    if not needed:
        return None
    ms, seq = min(needed)
    return f"{ms}-{seq}"


def retire(
    client: redis.Redis, keys: Keys, now_ms: int, retire_after_s: float, hosts: list[HostStatus]
) -> list[str]:
    """Remove the group and heartbeat of every host silent past ``retire_after_s`` (0: never)."""
    if retire_after_s <= 0:
        return []
    gone = [h for h in hosts if now_ms - h.last_seen_ms > retire_after_s * 1000]
    for host in gone:
        forget_host(client, keys, host.host)
        logger.warning(
            "retired host %s, silent for %.0f s (retire_after_s %s): its group and heartbeat "
            "are removed; if it comes back it starts from the ledger",
            host.host,
            (now_ms - host.last_seen_ms) / 1000,
            retire_after_s,
            extra={"retired": host.host},
        )
    return [h.host for h in gone]


def _index_tombstones(ledger: Ledger) -> None:
    """Once per Redis: put the tombstones of a ledger older than the index into it."""
    client, keys = ledger.client, ledger.keys
    if client.exists(keys.tombs_indexed):
        return
    indexed = 0
    pipe = client.pipeline(transaction=False)
    for field, raw in client.hscan_iter(keys.rules, count=_PAGE):
        record = RuleRecord.model_validate_json(raw)
        if record.deleted:
            pipe.zadd(keys.tombs, {text(field): entry_order(record.id)[0]})
            indexed += 1
    pipe.set(keys.tombs_indexed, "1")
    pipe.execute()
    if indexed:
        logger.info("indexed %d ledger tombstones for trimming", indexed)


def _forget_tombstones(ledger: Ledger, limit: tuple[int, int]) -> int:
    """Forget the tombstones older than ``limit``, reading only those (from the index)."""
    client, keys = ledger.client, ledger.keys
    forgotten, offset = 0, 0
    while True:
        fields: Any = client.zrangebyscore(keys.tombs, "-inf", limit[0], start=offset, num=_PAGE)
        if not fields:
            return forgotten
        raws: Any = client.hmget(keys.rules, fields)
        stale: list[tuple[Any, Any]] = []
        unindexed = []
        for field, raw in zip(fields, raws, strict=True):
            record = RuleRecord.model_validate_json(raw) if raw is not None else None
            if record is None or not record.deleted:
                unindexed.append(field)  # gone or live again: the fold re-indexes if needed
            elif entry_order(record.id) < limit:
                stale.append((field, raw))
            else:
                offset += 1  # the trim point's own millisecond, at or after it: kept
        if unindexed:
            client.zrem(keys.tombs, *unindexed)
        # a fold may have replaced a tombstone since it was read: delete only unchanged ones
        forgotten += ledger.forget(stale)
        if len(fields) < _PAGE:
            return forgotten


def _forget_list_tombstones(ledger: Ledger, limit: tuple[int, int]) -> int:
    """Forget removed and expired lists whose command is older than ``limit``: no entry
    that could bring them back is left. Lists are few: their hash is read whole."""
    raw: Any = ledger.client.hgetall(ledger.keys.lists)
    stale = []
    for field, value in raw.items():
        record = ListRecord.model_validate_json(value)
        over = record.deleted or (record.expires_ms is not None and record.expires_ms < limit[0])
        if over and entry_order(record.id) < limit:
            stale.append((field, value))
    return ledger.forget(stale, of_lists=True) if stale else 0


def _forget_expired_held(ledger: Ledger, now_ms: int) -> int:
    """Forget held records whose expiry has passed: no host holds them any longer. Held
    records are few (a rule or list whose newest command nobody verified)."""
    forgotten = 0
    for of_lists, where, model in (
        (False, ledger.keys.held, RuleRecord),
        (True, ledger.keys.held_lists, ListRecord),
    ):
        stale = []
        raw: Any = ledger.client.hgetall(where)
        for field, value in raw.items():
            expires_ms = model.model_validate_json(value).expires_ms
            if expires_ms is not None and expires_ms < now_ms:
                stale.append((field, value))
        if stale:
            forgotten += ledger.forget(stale, of_lists=of_lists, held=True)
    return forgotten


def trim(
    ledger: Ledger,
    now_ms: int,
    host_expiry_s: float,
    retire_after_s: float = 0,
) -> int:
    """Retire lost hosts, trim the stream, forget what is behind it; returns entries trimmed."""
    client, keys = ledger.client, ledger.keys
    hosts = read_hosts(client, keys)
    retired = set(retire(client, keys, now_ms, retire_after_s, hosts))
    hosts = [h for h in hosts if h.host not in retired]
    minid = trim_point(client, keys, now_ms, host_expiry_s, hosts)
    if minid is None:
        return 0
    trimmed = int(client.xtrim(keys.cmd, minid=minid, approximate=True, limit=0))
    limit = entry_order(minid)
    _index_tombstones(ledger)
    forgotten = _forget_tombstones(ledger, limit) + _forget_list_tombstones(ledger, limit)
    forgotten += _forget_expired_held(ledger, now_ms)
    if client.hlen(keys.seen):  # only entries with ids ahead of Redis's clock: rare
        stamps = client.hscan_iter(keys.seen, count=_PAGE)
        old_stamps = [f for f, _ in stamps if _before(f, limit)]
        if old_stamps:
            client.hdel(keys.seen, *old_stamps)
    if trimmed or forgotten:
        logger.info(
            "trimmed %d stream entries and %d tombstones before %s", trimmed, forgotten, minid
        )
    return trimmed
