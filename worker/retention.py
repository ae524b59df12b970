"""Bounded memory: trim the command stream to what live groups still need, drop old tombstones.

The stream is trimmed (``XTRIM MINID``) to the oldest entry still pending or undelivered in
the ledger group or in the group of a live host. A host silent for longer than the host
expiry no longer holds the stream back; when it returns it reconciles from the ledger.
Tombstones older than the trim point can go: no entry that could resurrect them is left.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from pushfw.producer.keys import Keys
from pushfw.producer.records import RuleRecord
from pushfw.worker.heartbeat import read_hosts
from pushfw.worker.ledger import Ledger
from pushfw.worker.stream import stream_id_order

logger = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _before(entry_id: Any, limit: tuple[int, int]) -> bool:
    return stream_id_order(_text(entry_id)) < limit


def _next_id(entry_id: str) -> str:
    ms, seq = stream_id_order(entry_id)
    return f"{ms}-{seq + 1}"


def trim_point(client: redis.Redis, keys: Keys, now_ms: int, host_expiry_s: float) -> str | None:
    """The oldest id any live consumer group still needs (None: nothing to trim by)."""
    live = {
        h.host for h in read_hosts(client, keys) if now_ms - h.last_seen_ms <= host_expiry_s * 1000
    }
    needed: list[tuple[int, int]] = []
    groups: Any = client.xinfo_groups(keys.cmd)
    for group in groups:
        name = _text(group["name"])
        if name != Keys.LEDGER_GROUP and name.removeprefix("host:") not in live:
            continue
        after_last = stream_id_order(_next_id(_text(group["last-delivered-id"])))
        summary: Any = client.xpending(keys.cmd, name) if int(group["pending"]) > 0 else {}
        oldest = summary.get("min")  # None if the pending entries were acked meanwhile
        needed.append(stream_id_order(_text(oldest)) if oldest is not None else after_last)
    if not needed:
        return None
    ms, seq = min(needed)
    return f"{ms}-{seq}"


def trim(ledger: Ledger, now_ms: int, host_expiry_s: float) -> int:
    """Trim the stream and forget tombstones and stamps behind it; returns entries trimmed."""
    client, keys = ledger.client, ledger.keys
    minid = trim_point(client, keys, now_ms, host_expiry_s)
    if minid is None:
        return 0
    trimmed = int(client.xtrim(keys.cmd, minid=minid))
    limit = stream_id_order(minid)
    stale: list[tuple[Any, Any]] = []
    for field, raw in client.hscan_iter(keys.rules, count=1000):
        record = RuleRecord.model_validate_json(raw)
        if record.deleted and stream_id_order(record.id) < limit:
            stale.append((field, raw))
    # a fold may have replaced a tombstone since the scan read it: delete only unchanged ones
    forgotten = ledger.forget(stale)
    old_stamps = [f for f, _ in client.hscan_iter(keys.seen, count=1000) if _before(f, limit)]
    if old_stamps:
        client.hdel(keys.seen, *old_stamps)
    if trimmed or forgotten:
        logger.info(
            "trimmed %d stream entries and %d tombstones before %s", trimmed, forgotten, minid
        )
    return trimmed
