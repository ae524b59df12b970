"""The Lua that writes the ledger: the one definition of its schema's every write.

:data:`FOLD` is a compare-and-set on the entry id: a record is replaced only by a newer
entry, so folds that arrive out of order (two consumers, a retry, a replay) still leave the
newest command's state. Deletes and commands that arrive already expired leave tombstones,
so an older insert replayed later cannot bring the rule back; tombstones are dropped once
the stream is trimmed past them (:data:`FORGET`). Both folds keep the held verified state
in the same step (:mod:`pushfw.worker.held`).

The scheduler's :data:`CLAIM` ends a timed rule: it writes a ttl tombstone that names the
entry it expired and XADDs the ``*.delete origin ttl``. The tombstone ranks as the entry it
expired, so a renewal added before the delete still wins when it is folded after it; the
renewal's record then says which delete it ``voided``. Folds skip the claim's deletes (the
claim folded them already) and every other ``*.delete origin ttl``: a forged one is void.
"""

from __future__ import annotations

from typing import Any

import redis

from pushfw.worker.clock import LUA_NOW_MS
from pushfw.worker.stream import LUA_ID_ORDER

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
"""Fold a batch of rule commands: compare-and-set on the entry id, held state kept alongside."""

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
"""End due timed rules still current: a ttl tombstone and a ``*.delete origin ttl`` each."""

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
The content of the held version (``{pushfw}:held-lists``, :mod:`pushfw.worker.held`) is
kept too.
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
"""Delete tombstones (or held records) that no fold replaced since retention read them."""


def claim_script(client: redis.Redis) -> Any:
    """The scheduler's claim, registered on its own connection."""
    return client.register_script(CLAIM)
