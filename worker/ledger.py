"""The Ledger role: fold every command, once, into the desired state in Redis.

Every worker reads the shared ``ledger`` consumer group, so any one of them may fold an
entry. The fold is a Lua compare-and-set on the entry id: a record is replaced only by a
newer entry, so folds that arrive out of order (two consumers, a retry, a replay) still
leave the newest command's state. Deletes and commands that arrive already expired leave
tombstones, so an older insert replayed later cannot bring the rule back; tombstones are
dropped once the stream is trimmed past them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from redis.typing import StreamIdT

from pushfw.producer.contract import Command, CommandRejected
from pushfw.producer.keys import Keys
from pushfw.producer.records import RuleRecord
from pushfw.worker.signing import Signing
from pushfw.worker.stream import Entry, ParsedEntries, entries_from_reply, stream_id_order

logger = logging.getLogger(__name__)

_NEWER = """
local function parse(id)
  local ms, seq = string.match(id, "^(%d+)-(%d+)$")
  return tonumber(ms), tonumber(seq)
end
local function newer(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams > bms or (ams == bms and aseq > bseq)
end
"""

FOLD = (
    _NEWER
    + """
-- KEYS: rules, expiry, then one marker key per record
-- ARGV: 4 per record: rule id, entry id, record json, expires ms or ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changed = 0
for i = 0, #ARGV / 4 - 1 do
  local rule, id, json, expires = ARGV[i*4+1], ARGV[i*4+2], ARGV[i*4+3], ARGV[i*4+4]
  local marker = KEYS[i + 3]
  local current = redis.call('HGET', KEYS[1], rule)
  if not current or newer(id, cjson.decode(current)['id']) then
    changed = changed + 1
    redis.call('HSET', KEYS[1], rule, json)
    if expires ~= '' then
      redis.call('ZADD', KEYS[2], expires, rule)
      local left = tonumber(expires) - now
      if left > 0 then
        redis.call('SET', marker, id, 'PX', left)
      end
    else
      redis.call('ZREM', KEYS[2], rule)
      redis.call('DEL', marker)
    end
  end
end
return changed
"""
)
_FOLD_CHUNK = 500


def record_for(entry: Entry, cmd: Command, now_ms: int) -> RuleRecord:
    """The ledger state a command sets; an insert already past its expiry is a tombstone."""
    expires_ms = entry.ms + cmd.ttl_s * 1000 if cmd.ttl_s else None
    expired = expires_ms is not None and expires_ms <= now_ms
    return RuleRecord(
        id=entry.id,
        action=cmd.action.value,
        network=str(cmd.network),
        expires_ms=None if expired or not cmd.is_insert else expires_ms,
        target=list(cmd.target),
        reason=cmd.reason,
        origin=cmd.origin,
        deleted=expired or not cmd.is_insert,
    )


class Ledger:
    """Folds the command stream into ``{pushfw}:rules`` and ``{pushfw}:expiry``."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        consumer: str,
        batch_size: int = 500,
        signing: Signing | None = None,
    ):
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self.batch_size = batch_size
        self.signing = signing or Signing()
        self.parsed = ParsedEntries()
        self._fold = client.register_script(FOLD)

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.cmd, Keys.LEDGER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def fold_new(self, block_ms: int | None = None) -> int:
        """Read the ledger group's next entries (non-blocking by default) and fold them."""
        reply: Any = self.client.xreadgroup(
            Keys.LEDGER_GROUP,
            self.consumer,
            {self.keys.cmd: ">"},
            count=self.batch_size,
            block=block_ms,
        )
        entries = entries_from_reply(reply[0][1]) if reply else []
        self.fold(entries)
        return len(entries)

    def fold(self, entries: list[Entry]) -> int:
        """Fold entries (invalid ones are only acknowledged); returns how many changed state."""
        if not entries:
            return 0
        seconds, micros = self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        records = [r for r in (self._record(e, now_ms) for e in entries) if r is not None]
        changed = 0
        for start in range(0, len(records), _FOLD_CHUNK):
            chunk = records[start : start + _FOLD_CHUNK]
            args: list[str] = []
            for record in chunk:
                args += [
                    record.rule_id,
                    record.id,
                    record.model_dump_json(exclude_defaults=True),
                    "" if record.expires_ms is None else str(record.expires_ms),
                ]
            markers = [self.keys.ttl_marker(r.rule_id) for r in chunk]
            changed += int(
                self._fold(keys=[self.keys.rules, self.keys.expiry, *markers], args=args)
            )
        self.client.xack(self.keys.cmd, Keys.LEDGER_GROUP, *(e.id for e in entries))
        logger.debug(
            "ledger folded %d of %d entries, %d changed state", len(records), len(entries), changed
        )
        return changed

    def _record(self, entry: Entry, now_ms: int) -> RuleRecord | None:
        """The state an entry sets; None for what every applier rejects."""
        if entry.fields is None:
            return None
        try:
            cmd = self.parsed.parse(entry)
            if self.signing.check(entry.fields, entry.ms, cmd):
                # an unsigned expiry: the scheduler's claim wrote its tombstone already, and
                # one it did not write (forged) must not reach the ledger
                return None
        except CommandRejected:
            return None
        return record_for(entry, cmd, now_ms)

    def catch_up(self, position: str) -> None:
        """Make the ledger hold every entry up to ``position`` before a host reconciles.

        New entries up to there are folded here; entries up to there that another ledger
        consumer holds pending are folded again (the fold is idempotent), so the ledger is
        never behind what this host has applied.
        """
        order = stream_id_order(position)
        while self._last_delivered() < order and self.fold_new():
            pass
        rows = self.client.xpending_range(
            self.keys.cmd, Keys.LEDGER_GROUP, min="-", max=position, count=100_000
        )
        ids: list[StreamIdT] = [row["message_id"] for row in rows]
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            claimed: Any = self.client.xclaim(
                self.keys.cmd, Keys.LEDGER_GROUP, self.consumer, 0, chunk
            )
            self.fold(entries_from_reply([c for c in claimed if c is not None]))

    def _last_delivered(self) -> tuple[int, int]:
        for group in self.client.xinfo_groups(self.keys.cmd):
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) == Keys.LEDGER_GROUP:
                last = group["last-delivered-id"]
                return stream_id_order(last.decode() if isinstance(last, bytes) else str(last))
        return (0, 0)

    def size(self) -> int:
        """How many records (tombstones included) the ledger holds."""
        return int(self.client.hlen(self.keys.rules))

    def records(self) -> Iterator[RuleRecord]:
        """Every record, tombstones included, read in HSCAN pages."""
        for _, raw in self.client.hscan_iter(self.keys.rules, count=1000):
            yield RuleRecord.model_validate_json(raw)

    def records_for(self, rule_ids: list[str]) -> dict[str, RuleRecord]:
        """The record (tombstones included) of each rule that has one."""
        values: Any = self.client.hmget(self.keys.rules, rule_ids) if rule_ids else []
        return {
            rid: RuleRecord.model_validate_json(raw)
            for rid, raw in zip(rule_ids, values, strict=True)
            if raw is not None
        }

    def newest_ids(self, rule_ids: list[str]) -> dict[str, str]:
        """The entry id of the newest command folded for each rule that has a record."""
        if not rule_ids:
            return {}
        values: Any = self.client.hmget(self.keys.rules, rule_ids)
        return {
            rid: RuleRecord.model_validate_json(raw).id
            for rid, raw in zip(rule_ids, values, strict=True)
            if raw is not None
        }
