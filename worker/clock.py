"""Redis's clock decides time: when a command was first seen, whatever its entry id says.

An entry id's millisecond part is Redis's clock at XADD, unless the producer chose the id:
``XADD {pushfw}:cmd 1999999999999-0 ...`` is allowed (an ACL cannot stop it), and Redis then
gives every later ``*`` entry an id after it. For an entry whose id is ahead of Redis's
clock, the time that counts (expiry, signature window) is Redis's clock when a worker first
read it: the first reader stamps it atomically in ``{pushfw}:seen`` and every other reader,
on any host and in the ledger, reads that same stamp. Such entries are counted in
``{pushfw}:ahead``, which ``pushfw status`` shows. Entries at or behind the clock cost
nothing beyond the ``TIME`` each batch already needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from pushfw.producer.connection import redis_ms, text, time_ms
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.keys import Keys
from pushfw.worker.stream import LUA_ID_ORDER, Entry

__all__ = ["LUA_NOW_MS", "Clock", "SyncedClock"]

logger = logging.getLogger(__name__)

LUA_NOW_MS = """
-- Redis's time in ms, as redis_ms() reads it from outside a script
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

STAMP = (
    LUA_ID_ORDER
    + LUA_NOW_MS
    + """
-- KEYS: seen, ahead; ARGV: entry ids that are ahead of the caller's clock or may be stamped
-- Returns each entry's first-seen ms, in order.
local now = now_ms()
local out = {}
for i, id in ipairs(ARGV) do
  local stamp = redis.call('HGET', KEYS[1], id)
  local ms = parse(id)
  if stamp then
    out[i] = tonumber(stamp)
  elseif ms > now then
    redis.call('HSET', KEYS[1], id, now)
    redis.call('HINCRBY', KEYS[2], 'count', 1)
    redis.call('HSETNX', KEYS[2], 'first_ms', now)
    redis.call('HSET', KEYS[2], 'last_ms', now)
    local newest = redis.call('HGET', KEYS[2], 'max_id')
    if not newest or newer(id, newest) then
      redis.call('HSET', KEYS[2], 'max_id', id, 'max_ahead_ms', string.format('%d', ms - now))
    end
    out[i] = now
  else
    out[i] = ms
  end
end
return out
"""
)


NOW = """
-- KEYS: ahead. Redis's time, and the newest entry id ever found ahead of it
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGET', KEYS[1], 'max_id')}
"""


class Clock:
    """Redis's time now, and when each entry was first seen (one round trip per batch)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._stamp = client.register_script(STAMP)
        self._now = client.register_script(NOW)
        self.stamped = 0
        """Entries this worker found ahead of Redis's clock."""
        self._newest_noted = (0, 0)

    def now_ms(self) -> int:
        return redis_ms(self.client)

    def read(self, entries: Sequence[Entry]) -> tuple[int, dict[str, int]]:
        """Redis's ms now, and the first-seen ms of each entry (its id's ms unless stamped)."""
        # one script, not a pipeline: a cluster client refuses TIME in a pipeline
        seconds, micros, raw_max = self._now(keys=[self.keys.ahead])
        now_ms = time_ms(seconds, micros)
        seen = {e.id: e.ms for e in entries}
        limit = entry_order(text(raw_max)) if raw_max is not None else (0, 0)
        lookup = [e.id for e in entries if e.ms > now_ms or e.order <= limit]
        if lookup:
            stamps: list[Any] = self._stamp(keys=[self.keys.seen, self.keys.ahead], args=lookup)
            for entry_id, ms in zip(lookup, stamps, strict=True):
                seen[entry_id] = int(ms)
                order = entry_order(entry_id)
                if order[0] > int(ms) and order > self._newest_noted:
                    self._newest_noted = order
                    self._note(entry_id, order[0] - int(ms))
        return now_ms, seen

    def _note(self, entry_id: str, ahead_ms: int) -> None:
        self.stamped += 1
        if self.stamped == 1 or self.stamped % 1000 == 0:
            logger.warning(
                "entry %s has an id %.1f s ahead of Redis's clock (a producer chose it); "
                "its time is taken from when it was first seen (%d such entries so far)",
                entry_id,
                ahead_ms / 1000,
                self.stamped,
            )


class SyncedClock:
    """Redis's clock, estimated locally so expiry keeps working while Redis is away.

    Each batch's ``TIME`` resyncs it; every role and the backend read the one the worker
    builds, so all of them agree on when a timed rule ends.
    """

    def __init__(self) -> None:
        self._offset_ms = 0

    def sync(self, redis_ms: int) -> None:
        self._offset_ms = redis_ms - int(time.time() * 1000)

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self._offset_ms
