"""The Ledger role, and the one definition of the ledger's schema and of every script writing it.

Every worker reads the shared ``ledger`` consumer group, so any one of them may fold an
entry. The fold is a Lua compare-and-set on the entry id: a record is replaced only by a
newer entry, so folds that arrive out of order (two consumers, a retry, a replay) still
leave the newest command's state. Deletes and commands that arrive already expired leave
tombstones, so an older insert replayed later cannot bring the rule back; tombstones are
dropped once the stream is trimmed past them (:data:`FORGET`).

The ledger records only commands that pass validation, whoever folds them: the fold does
not apply the folding worker's signature policy or protected networks (each host has its
own). A signed command's record keeps its signed fields and signature, so every host
checks the record against its own policy (:mod:`pushfw.worker.decide`) before reconcile
installs it.

**Held state.** A command a worker holding the key verified is folded with ``checked``.
When a command nobody verified (unsigned, forged, or folded by a worker without the key)
replaces a checked record, the fold moves the checked one to ``{pushfw}:held`` (lists:
``{pushfw}:held-lists``), in the same step; a newer checked command clears it. So the
ledger always holds the newest state a host with ``require_signature`` may take, even
after an unsigned ``undrop`` or ``list.delete``, and such a host reconciles to it
(:func:`pushfw.worker.decide.decide_record`). Hosts without ``require_signature``
never read it: for them the newest command wins, as before.

The scheduler's :data:`CLAIM` ends a timed rule: it writes a ttl tombstone that names the
entry it expired and XADDs the ``*.delete origin ttl``. The tombstone ranks as the entry it
expired, so a renewal added before the delete still wins when it is folded after it; the
renewal's record then says which delete it ``voided``. Folds skip the claim's deletes (the
claim folded them already) and every other ``*.delete origin ttl``: a forged one is void.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import redis
from pydantic_core import to_json
from redis.typing import StreamIdT

from pushfw.producer.connection import text
from pushfw.producer.contract import LIST_SIGNED_FIELDS, SIGNED_FIELDS, CommandRejected
from pushfw.producer.keys import Keys
from pushfw.producer.lists import ListCommand, is_list_entry, parse_list_command
from pushfw.producer.records import ListRecord, RuleRecord, rule_id
from pushfw.producer.wire import ParsedCommand
from pushfw.worker.clock import LUA_NOW_MS, Clock
from pushfw.worker.decide import is_signed, refused_by_every_host
from pushfw.worker.expiry import expired, expires_at
from pushfw.worker.signing import Signing
from pushfw.worker.stream import (
    LUA_ID_ORDER,
    Entry,
    ParsedEntries,
    entries_from_reply,
    stream_id_order,
)

logger = logging.getLogger(__name__)

FOLD = (
    LUA_ID_ORDER
    + LUA_NOW_MS
    + """
-- KEYS: rules, expiry, tombs, held, then one marker key per record
-- ARGV: 5 per record: rule id, entry id, record json, expires ms or '', '1' if the folding
--       worker verified the command's signature else ''
local now = now_ms()
local changed = 0
for i = 0, #ARGV / 5 - 1 do
  local rule, id, json, expires = ARGV[i*5+1], ARGV[i*5+2], ARGV[i*5+3], ARGV[i*5+4]
  local checked = ARGV[i*5+5] == '1'
  local marker = KEYS[i + 5]
  local raw = redis.call('HGET', KEYS[1], rule)
  local cur = nil
  local replace = true
  -- compact JSON: a top-level "deleted":true cannot occur inside a string value
  local deleted = string.find(json, '"deleted":true', 1, true) ~= nil
  if raw then
    cur = cjson.decode(raw)
    local rank = cur['id']
    if cur['deleted'] and cur['origin'] == 'ttl' and type(cur['expired_id']) == 'string' then
      rank = cur['expired_id']
    end
    replace = newer(id, rank)
    if replace and newer(cur['id'], id) then
      -- added before the scheduler's delete of an older state, folded after it
      json = string.sub(json, 1, -2) .. ',"voided":' .. cjson.encode(cur['id']) .. '}'
    end
  end
  if replace then
    changed = changed + 1
    redis.call('HSET', KEYS[1], rule, json)
    if deleted then
      redis.call('ZADD', KEYS[3], tonumber(string.match(id, '^(%d+)')), rule)
    else
      redis.call('ZREM', KEYS[3], rule)
    end
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
    -- the newest verified state: the newest record itself, or the one it replaced (held
    -- only while the newest record is not checked; a checked tombstone holds nothing)
    local was_checked = cur ~= nil and cur['checked'] == true
    if checked and not was_checked then
      redis.call('HDEL', KEYS[4], rule)
    elseif was_checked and not checked and not cur['deleted'] then
      redis.call('HSET', KEYS[4], rule, raw)
    end
  elseif checked and cur['checked'] ~= true then
    -- a verified command folded behind a newer one nobody verified
    local held = redis.call('HGET', KEYS[4], rule)
    if not held or newer(id, cjson.decode(held)['id']) then
      if deleted then
        redis.call('HDEL', KEYS[4], rule)
      else
        redis.call('HSET', KEYS[4], rule, json)
      end
    end
  end
end
return changed
"""
)

CLAIM = (
    LUA_NOW_MS
    + """
-- KEYS: rules, expiry, cmd, tombs, then one marker key per rule id; ARGV: rule ids
-- Returns the ids of the delete entries it added.
local now = now_ms()
local emitted = {}
for i, rule in ipairs(ARGV) do
  local score = redis.call('ZSCORE', KEYS[2], rule)
  if score and tonumber(score) <= now then
    local raw = redis.call('HGET', KEYS[1], rule)
    local rec = raw and cjson.decode(raw)
    if not rec or rec['deleted'] or tonumber(rec['expires_ms']) ~= tonumber(score) then
      redis.call('ZREM', KEYS[2], rule)
    else
      local fields = {'op', rec['action'] .. '.delete', 'ip', rec['network'], 'origin', 'ttl'}
      local tomb = {action = rec['action'], network = rec['network'], deleted = true,
                    origin = 'ttl', expired_id = rec['id'], expired_ms = tonumber(score)}
      if type(rec['target']) == 'table' and #rec['target'] > 0 then
        table.insert(fields, 'target')
        table.insert(fields, table.concat(rec['target'], ','))
        tomb['target'] = rec['target']
      end
      local id = redis.call('XADD', KEYS[3], '*', unpack(fields))
      tomb['id'] = id
      redis.call('HSET', KEYS[1], rule, cjson.encode(tomb))
      redis.call('ZADD', KEYS[4], tonumber(string.match(id, '^(%d+)')), rule)
      redis.call('ZREM', KEYS[2], rule)
      redis.call('DEL', KEYS[i + 4])
      table.insert(emitted, id)
    end
  end
end
return emitted
"""
)

LIST_FOLD = (
    LUA_ID_ORDER
    + """
-- KEYS: lists, the content key of the version this command loads (or the lists key
--       again), held lists
-- ARGV: name, entry id, record json, version or '', content key prefix, grace ms,
--       expires ms or '', '1' if the folding worker verified the command's signature
local checked = ARGV[8] == '1'
local deleted = string.find(ARGV[3], '"deleted":true', 1, true) ~= nil
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local cur = raw and cjson.decode(raw)
local held_raw = redis.call('HGET', KEYS[3], ARGV[1])
local held = held_raw and cjson.decode(held_raw)
local before = {}
if cur and not cur['deleted'] and cur['version'] then
  before[cur['version']] = true
end
if held and held['version'] then
  before[held['version']] = true
end
local changed = 1
local newest = cur
if cur and not newer(ARGV[2], cur['id']) then
  -- an older command: it may only be the newest verified state, behind one nobody verified
  if not checked or cur['checked'] == true or (held and not newer(ARGV[2], held['id'])) then
    return 0
  end
  changed = 0
  if deleted then
    redis.call('HDEL', KEYS[3], ARGV[1])
    held = nil
  else
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
    held = cjson.decode(ARGV[3])
  end
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  newest = nil
  if ARGV[4] ~= '' then
    if ARGV[7] ~= '' then
      redis.call('PEXPIREAT', KEYS[2], tonumber(ARGV[7]) + tonumber(ARGV[6]))
    else
      redis.call('PERSIST', KEYS[2])
    end
  end
  if checked and held then
    redis.call('HDEL', KEYS[3], ARGV[1])
    held = nil
  elseif not checked and cur and cur['checked'] == true and not cur['deleted'] then
    redis.call('HSET', KEYS[3], ARGV[1], raw)
    held = cur
  end
end
-- content a record still refers to stays (with a timed list's expiry); the rest expires
-- after the grace. All content keys share the hash tag: the same slot on a cluster.
local kept = {}
if not deleted and ARGV[4] ~= '' and changed == 1 then
  kept[ARGV[4]] = true
end
local refers = {}
if newest then
  table.insert(refers, newest)
end
if held then
  table.insert(refers, held)
end
for _, rec in ipairs(refers) do
  if not rec['deleted'] and rec['version'] and not kept[rec['version']] then
    kept[rec['version']] = true
    if rec['expires_ms'] then
      redis.call('PEXPIREAT', ARGV[5] .. rec['version'], rec['expires_ms'] + tonumber(ARGV[6]))
    else
      redis.call('PERSIST', ARGV[5] .. rec['version'])
    end
  end
end
for version in pairs(before) do
  if not kept[version] then
    redis.call('PEXPIRE', ARGV[5] .. version, ARGV[6])
  end
end
return changed
"""
)
"""Fold one list command: compare-and-set on the entry id, like :data:`FOLD` for rules.

The content of the version it replaces is not deleted but left to expire after a grace
period, and the content it installs is kept (``PERSIST``): a re-import of an older version
that is written before the fold of the version between them then still finds its content.
The content of the held version (``{pushfw}:held-lists``, see :class:`Ledger`) is kept too.
A host that reads a command whose content is gone finds a newer record in the ledger and
skips it (:mod:`pushfw.worker.lists`)."""
LIST_CONTENT_GRACE_MS = 3_600_000

FORGET = """
-- KEYS: rules (or lists, or a held hash), tombs where it indexes them; ARGV: field,
-- value, ...: delete each field that still holds that value, with its tombstone index entry
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
    if KEYS[2] then
      redis.call('ZREM', KEYS[2], ARGV[i])
    end
  end
end
return n
"""
_FOLD_CHUNK = 500
_SIGNED = frozenset(name.encode() for name in (*SIGNED_FIELDS, "sig"))


def signed_fields(entry: Entry, names: frozenset[bytes]) -> dict[str, str]:
    """A signed entry's signed fields and ``sig``, kept so every host can verify the record."""
    fields = entry.fields or {}
    if not any(k.lower() == b"sig" for k in fields):
        return {}
    return {
        k.lower().decode("utf-8", "replace"): v.decode("utf-8", "replace")
        for k, v in fields.items()
        if k.lower() in names
    }


class Folded(NamedTuple):
    """What one command writes to the ledger: its rule, entry id, record JSON and expiry."""

    rule_id: str
    id: str
    json: bytes
    expires_ms: int | None
    checked: bool = False


def folded(
    entry: Entry, cmd: ParsedCommand, seen_ms: int, now_ms: int, checked: bool = False
) -> Folded:
    """The ledger state a command sets; an insert already past its expiry is a tombstone.

    ``checked``: the folding worker verified the command's signature with its key.

    The JSON is :class:`RuleRecord`'s (``model_dump_json(exclude_defaults=True)``), written
    from a dict: a model per command cost the fold as much as the rest of it.
    """
    expires_ms = expires_at(seen_ms, cmd.ttl_s)
    deleted = expired(expires_ms, now_ms) or not cmd.is_insert
    action = cmd.action.value
    network = str(cmd.network)
    record: dict[str, object] = {"id": entry.id, "action": action, "network": network}
    if not deleted and expires_ms is not None:
        record["expires_ms"] = expires_ms
    if cmd.target:
        record["target"] = list(cmd.target)
    if cmd.reason:
        record["reason"] = cmd.reason
    if cmd.origin:
        record["origin"] = cmd.origin
    if deleted:
        record["deleted"] = True
    if seen_ms != entry.ms:
        record["seen_ms"] = seen_ms
    signed = signed_fields(entry, _SIGNED)
    if signed:
        record["signed"] = signed
        if checked:
            record["checked"] = True
    return Folded(
        rule_id(action, network),
        entry.id,
        to_json(record),
        None if deleted else expires_ms,
        checked and bool(signed),
    )


def record_for(entry: Entry, cmd: ParsedCommand, seen_ms: int, now_ms: int) -> RuleRecord:
    """The ledger record a command sets, as a model (what the fold writes, read back)."""
    return RuleRecord.model_validate_json(folded(entry, cmd, seen_ms, now_ms).json)


_LIST_SIGNED = frozenset(name.encode() for name in (*LIST_SIGNED_FIELDS, "sig"))


def list_record_for(
    entry: Entry, cmd: ListCommand, seen_ms: int, checked: bool = False
) -> ListRecord:
    """The ledger state a list command sets (``checked``: as for :func:`folded`)."""
    signed = signed_fields(entry, _LIST_SIGNED)
    return ListRecord(
        id=entry.id,
        name=cmd.name,
        version=cmd.version,
        action=cmd.action.value,
        size=cmd.size,
        expires_ms=expires_at(seen_ms, cmd.ttl_s),
        target=list(cmd.target),
        reason=cmd.reason,
        deleted=not cmd.is_insert,
        seen_ms=seen_ms if seen_ms != entry.ms else None,
        signed=signed,
        checked=checked and bool(signed),
    )


class Ledger:
    """Folds the command stream into ``{pushfw}:rules`` and ``{pushfw}:expiry``.

    ``signing``: the folding worker's signature policy; with a key, the records of commands
    whose signature it verifies are ``checked`` (their state is then held, see above).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        consumer: str,
        batch_size: int = 500,
        clock: Clock | None = None,
        signing: Signing | None = None,
    ):
        self.client = client
        self.signing = signing
        self.keys = keys
        self.consumer = consumer
        self.batch_size = batch_size
        self.clock = clock or Clock(client, keys)
        self.parsed = ParsedEntries()
        self._fold = client.register_script(FOLD)
        self._fold_list = client.register_script(LIST_FOLD)
        self._forget = client.register_script(FORGET)

    def ensure_group(self) -> None:
        """Create the ledger group, and the generation marker with it if the ledger is new.

        A ledger that has records but no marker predates markers: it gets one too.
        """
        try:
            self.client.xgroup_create(self.keys.cmd, Keys.LEDGER_GROUP, id="0", mkstream=True)
            created = True
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            created = False
        if created or self.size() > 0:
            token = secrets.token_hex(8)
            if self.client.set(self.keys.generation, token, nx=True):
                logger.info("ledger generation %s begins", token)

    def generation(self) -> str | None:
        """The marker written once when this ledger began (None: Redis lost it, or too old)."""
        raw: Any = self.client.get(self.keys.generation)
        return text(raw) if raw is not None else None

    def fold_own_pending(self) -> int:
        """Fold the entries this consumer read for the ledger but never folded."""
        folded = 0
        while True:
            reply: Any = self.client.xreadgroup(
                Keys.LEDGER_GROUP, self.consumer, {self.keys.cmd: "0"}, count=self.batch_size
            )
            entries = entries_from_reply(reply[0][1]) if reply else []
            if not entries:
                return folded
            self.fold(entries)
            folded += len(entries)

    def recover(self, idle_ms: int) -> int:
        """Fold what this consumer read but never folded (it crashed), then what other ledger
        consumers left pending longer than ``idle_ms`` (they died); returns entries folded.

        https://redis.io/commands/xautoclaim/
        """
        folded = self.fold_own_pending()
        start = "0-0"
        while True:
            claimed: Any = self.client.xautoclaim(
                self.keys.cmd, Keys.LEDGER_GROUP, self.consumer, idle_ms, start, self.batch_size
            )
            start = text(claimed[0])
            entries = entries_from_reply([e for e in claimed[1] if e is not None])
            self.fold(entries)
            folded += len(entries)
            if start == "0-0":
                break
        if folded:
            logger.info("ledger folded %d entries left pending by a crash", folded)
        return folded

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
        now_ms, seen = self.clock.read(entries)
        lists = [e for e in entries if is_list_entry(e.fields)]
        if lists:
            for entry in lists:
                self._fold_list_entry(entry, seen[entry.id])
            entries_of_rules = [e for e in entries if not is_list_entry(e.fields)]
        else:
            entries_of_rules = entries
        records = [
            r
            for r in (self._record(e, seen[e.id], now_ms) for e in entries_of_rules)
            if r is not None
        ]
        changed = 0
        for start in range(0, len(records), _FOLD_CHUNK):
            chunk = records[start : start + _FOLD_CHUNK]
            args: list[str | bytes] = []
            for record in chunk:
                expires = record.expires_ms
                args += [
                    record.rule_id,
                    record.id,
                    record.json,
                    "" if expires is None else str(expires),
                    "1" if record.checked else "",
                ]
            markers = [self.keys.ttl_marker(r.rule_id) for r in chunk]
            keys = [self.keys.rules, self.keys.expiry, self.keys.tombs, self.keys.held]
            changed += int(self._fold(keys=[*keys, *markers], args=args))
        self.client.xack(self.keys.cmd, Keys.LEDGER_GROUP, *(e.id for e in entries))
        logger.debug(
            "ledger folded %d of %d entries, %d changed state", len(records), len(entries), changed
        )
        return changed

    def _fold_list_entry(self, entry: Entry, seen_ms: int) -> bool:
        """Fold one ``list.*`` command (an invalid one is only acknowledged)."""
        assert entry.fields is not None
        try:
            cmd = parse_list_command(entry.fields)
        except CommandRejected:
            return False
        record = list_record_for(entry, cmd, seen_ms, self._verifies(entry, seen_ms))
        content = self.keys.list_content(cmd.name, cmd.version) if cmd.version else None
        return bool(
            self._fold_list(
                keys=[self.keys.lists, content or self.keys.lists, self.keys.held_lists],
                args=[
                    cmd.name,
                    entry.id,
                    record.model_dump_json(exclude_defaults=True),
                    cmd.version,
                    self.keys.list_content(cmd.name, ""),
                    LIST_CONTENT_GRACE_MS,
                    "" if record.expires_ms is None else str(record.expires_ms),
                    "1" if record.checked else "",
                ],
            )
        )

    def _verifies(self, entry: Entry, seen_ms: int) -> bool:
        """Whether this worker holds the key and the entry's signature passes it."""
        signing = self.signing
        if signing is None or signing.key is None or not is_signed(entry.fields):
            return False
        assert entry.fields is not None
        try:
            signing.check(entry.fields, seen_ms)
        except CommandRejected:
            return False
        return True

    def _record(self, entry: Entry, seen_ms: int, now_ms: int) -> Folded | None:
        """The state an entry sets; None for what every host refuses."""
        if entry.fields is None:
            return None
        try:
            cmd = self.parsed.parse(entry)
        except CommandRejected:
            return None
        if refused_by_every_host(cmd, entry.fields):
            return None
        return folded(entry, cmd, seen_ms, now_ms, self._verifies(entry, seen_ms))

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
            if text(name) == Keys.LEDGER_GROUP:
                last = group["last-delivered-id"]
                return stream_id_order(text(last))
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

    def held(self) -> dict[str, RuleRecord]:
        """The held records (the newest verified state of rules whose newest command nobody
        verified), by rule id."""
        return {
            text(k): RuleRecord.model_validate_json(v)
            for k, v in self.client.hscan_iter(self.keys.held, count=1000)
        }

    def forget(
        self, stale: Sequence[tuple[Any, Any]], of_lists: bool = False, held: bool = False
    ) -> int:
        """Delete tombstones (field, raw value) that no fold replaced since they were read;
        ``of_lists``: in ``{pushfw}:lists`` (which the tombstone index does not cover);
        ``held``: held records (in ``{pushfw}:held``, or ``:held-lists`` with ``of_lists``)."""
        forgotten = 0
        where = [self.keys.lists if of_lists else self.keys.rules, self.keys.tombs]
        if held:
            where = [self.keys.held_lists if of_lists else self.keys.held]
        for start in range(0, len(stale), 1000):
            args = [part for pair in stale[start : start + 1000] for part in pair]
            forgotten += int(self._forget(keys=where, args=args))
        return forgotten


def claim_script(client: redis.Redis) -> Any:
    """The scheduler's claim, registered on its own connection."""
    return client.register_script(CLAIM)
